"""save_pretrained / from_pretrained round trip, the errors of a broken model directory, and the
atomic writes and PNG grid of `mmgen.files`."""

import json

import pytest
import torch
from conftest import digit

from mmgen.files import atomic_write, save_image_grid, write_json
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # not JSON-serializable: fails before the rename
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic_write(path, b"\x00raw")
    assert path.read_bytes() == b"\x00raw"


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "model").write_text("")
    with pytest.raises(FileNotFoundError, match="is a file, not a mmgen model directory"):
        MMGenModel.from_pretrained(tmp_path / "model")


@pytest.mark.parametrize("shape, size", [((3, 1, 8, 8), (3 * 18 + 2, 20)), ((2, 3, 3, 8, 8), (3 * 18 + 2, 2 * 18 + 2))])
def test_image_grid_takes_one_row_or_rows(tmp_path, shape, size):
    from PIL import Image

    save_image_grid(torch.zeros(shape), tmp_path / "sub" / "grid.png", scale=2, pad=2)
    with Image.open(tmp_path / "sub" / "grid.png") as im:
        assert im.size == size and im.mode == ("L" if shape[-3] == 1 else "RGB")
        assert im.getpixel((2, 2)) in (128, (128, 128, 128))  # 0 in [-1, 1] is mid-grey; the canvas is 64
