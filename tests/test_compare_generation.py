"""`compare-tokenizers --generation`: one row per (tokenizer, interface), trained the same way."""

import math

import pytest

from mmgen.cli import main
from mmgen.compare_generation import compare_generation, parse_spec


def test_rows_for_each_interface(tmp_path):
    rows = compare_generation(["pixels", "pixels:mar"], tmp_path, steps=2, per_digit=1, progress=False)
    assert [(r["tokenizer"], r["interface"]) for r in rows] == [("pixels", "diffusion"), ("pixels", "mar")]
    for r in rows:
        assert 0 <= r["prompted acc"] <= 1 and 0 <= r["caption acc"] <= 1 and math.isfinite(r["gen FWD"])
        assert (tmp_path / f"pixels-{r['interface']}" / "samples.png").is_file()


def test_bad_specs_fail_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an image tokenizer directory"):
        parse_spec(str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="--data digits"):
        main(["compare-tokenizers", "pixels", "--data", "shapes", "--generation", "--out", str(tmp_path)])
