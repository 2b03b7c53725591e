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


def test_config_and_weights_that_disagree(model, tmp_path):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["backbone"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        MMGenModel.from_pretrained(tmp_path)


def test_unknown_config_key(model, tmp_path):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["backbone"]["hiden_size"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hiden_size"):
        MMGenModel.from_pretrained(tmp_path)


def test_no_temporary_files_left(model, tmp_path):
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # overwrite in place
    assert not list(tmp_path.glob("*.tmp"))
