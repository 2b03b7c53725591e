"""Image I/O at the string/picture boundary, and the CLI end to end on a micro model."""

import numpy as np
import pytest
import torch
from conftest import digit
from PIL import Image

from mmgen.cli import main
from mmgen.data.images import load_image
from mmgen.pipeline import Pipeline, to_pil


def test_image_round_trip_through_png(tmp_path):
    x = digit(4)
    to_pil(x).save(tmp_path / "d.png")
    y = load_image(tmp_path / "d.png", 1, 8)
    assert y.shape == (1, 8, 8) and (y - x).abs().max() <= 1 / 127.5 + 1e-6


def test_conversions_of_other_inputs():
    rgb = Image.new("RGB", (32, 32), (255, 0, 0))
    assert load_image(rgb, 1, 8).shape == (1, 8, 8)  # converted to the model's mode and size
    assert load_image(np.zeros((8, 8), np.uint8), 1, 8).min() == -1
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((8, 8), np.float32), 1, 8)
    with pytest.raises(ValueError, match="unsupported image type"):
        load_image(3, 1, 8)
    with pytest.raises(ValueError, match="aspect ratio"):
        load_image(Image.new("L", (64, 8)), 1, 8)
    with pytest.raises(ValueError, match="at least 2 pixels"):
        load_image(np.zeros((1, 1), np.uint8), 1, 8)
    with pytest.raises(ValueError, match="2-channel"):
        load_image(torch.zeros(2, 8, 8), 3, 8)
    assert load_image(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), 3, 8).min() == 1  # transparent over white
    assert ((load_image(Image.new("I;16", (8, 8), 4000), 1, 8) + 1) * 127.5).round().eq(16).all()  # 4000 / 257
    assert load_image(Image.new("CMYK", (8, 8)), 3, 8).shape == (3, 8, 8)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        load_image(tmp_path / "bad.png", 1, 8)
    with pytest.raises(ValueError, match="none.png: file not found"):
        load_image(tmp_path / "none.png", 1, 8)


@pytest.fixture
def model_dir(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "m", tokenizer)
    return tmp_path / "m"


def test_pipeline_draw_and_caption(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    from mmgen.generation import GenerationOptions

    images = pipe.draw(["a handwritten digit 3", "digit 4"], GenerationOptions(image_steps=3))
    assert len(images) == 2 and images[0].shape == (1, 8, 8) and images[0].abs().max() <= 1
    caps = pipe.caption([digit(0)], GenerationOptions(max_new_tokens=4, temperature=0))
    assert isinstance(caps[0], str)


def test_cli_generate_and_caption(model_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    main(["generate", "a handwritten digit 3", "--model", str(model_dir), "-o", str(out), "--steps", "3", "-n", "2"])
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2 and Image.open(paths[0]).size == (64, 64)
    main(["caption", paths[0], "--model", str(model_dir), "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith(paths[0] + "\t")


def test_cli_errors_are_messages(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--model", str(tmp_path / "nope")])
    assert e.value.code == 2 and "not a model directory" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(SystemExit) as e:
        main(["caption", str(tmp_path / "bad.png"), "--model", str(model_dir)])
    assert e.value.code == 2 and "not a readable image" in capsys.readouterr().err


def test_cli_train_runs_end_to_end(tmp_path, capsys):
    main(["train", "--out", str(tmp_path / "run"), "--train-steps", "3", "--eval-per-digit", "1"])
    out = capsys.readouterr().out
    assert "prompted_class_accuracy" in out and (tmp_path / "run" / "digits_grid.png").is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_cli_sampler_and_guidance_options(model_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    main(["generate", "digit 5", "--model", str(model_dir), "-o", str(out), "--steps", "4", "--sampler", "dpmpp_2m_sde",
          "--schedule", "karras", "--guidance-kind", "apg", "--apg-eta", "0.5", "--apg-norm", "2", "--rescale", "0.5",
          "--threshold", "imagen", "--interval", "0.1", "50", "--cache-threshold", "0.1"])
    assert Image.open(capsys.readouterr().out.strip()).size == (64, 64)
