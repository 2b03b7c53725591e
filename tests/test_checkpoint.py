"""save_pretrained / from_pretrained round trip and the errors of a broken model directory."""

import json

import pytest
import torch

from conftest import digit
from mmgen.model import MMGenModel
from mmgen.tokenizers.text import TextTokenizer


@torch.no_grad()
def test_round_trip_gives_identical_outputs(model, builder, tokenizer, tmp_path):
    model.save_pretrained(tmp_path, tokenizer)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    again = MMGenModel.from_pretrained(tmp_path)
    b = builder([["a digit", digit(), "seven"]])
    torch.manual_seed(0)
    a = model.loss(b, torch.Generator().manual_seed(1))
    c = again.loss(b, torch.Generator().manual_seed(1))
    assert a["loss"].item() == c["loss"].item()
    assert TextTokenizer.load(tmp_path).encode("seven") == tokenizer.encode("seven")
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_file_is_named(model, tmp_path, missing):
    model.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        MMGenModel.from_pretrained(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MMGenModel.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize(
    "key, value, match",
    [("num_hidden_layers", 3, "does not match"), ("hiden_size", 3, "hiden_size")],  # weights mismatch; a typo
)
def test_bad_config_is_named(model, tmp_path, key, value, match):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["backbone"][key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        MMGenModel.from_pretrained(tmp_path)


def test_no_temporary_files_left(model, tmp_path):
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # overwrite in place
    assert not list(tmp_path.glob("*.tmp"))
