"""`compare-tokenizers --generation`: one row per (tokenizer, interface), each run trained by the
trainer on `digits-tiny`, saved, and measured on the images it actually drew."""

import pytest
import torch
from train_helpers import MICRO_MODEL, restore_threads  # noqa: F401 (autouse fixture)

from mmgen.cli import main
from mmgen.compare_generation import compare_generation, parse_spec
from mmgen.config import ImageTokenizerConfig
from mmgen.data.digits import DigitsDataset
from mmgen.evaluation import DigitClassifier, caption_accuracy, generate_digits, prompted_accuracy
from mmgen.files import save_image_grid
from mmgen.generation import GenerationOptions
from mmgen.metrics import frechet_wavelet_distance
from mmgen.pipeline import Pipeline
from mmgen.tokenizers.image import build_image_tokenizer
from mmgen.train.tracking import read_log

# the micro backbone on 100 digits, so three runs and their measurements take seconds
MICRO = {"model.backbone": MICRO_MODEL["backbone"], "data.sources.0.limit": 100, "train.batch_size": 16,
         "log.every": 1, "log.tensorboard": False}


def untrained_vq(path) -> str:
    """A 1×8² VQ tokenizer on a 2×2 grid (downsample 4): 4 codes per image."""
    torch.manual_seed(0)
    config = ImageTokenizerConfig(kind="vq", downsample=4, latent_channels=4, codebook_size=16, width=8)
    build_image_tokenizer(config).save_pretrained(path)
    return str(path)


def test_rows_come_from_the_saved_runs_and_the_images_they_drew(tmp_path):
    vq = untrained_vq(tmp_path / "vq4")
    rows = compare_generation(["pixels", "pixels:mar", vq], tmp_path / "out", steps=3, per_digit=2, progress=False,
                              overrides=MICRO)
    assert [(r["tokenizer"], r["interface"], r["tokens/image"]) for r in rows] == [
        ("pixels", "diffusion", 16), ("pixels", "mar", 16), ("vq4", "discrete", 4)]  # 2×2 patches; codes: patch 1
    classifier, held_out = DigitClassifier(), DigitsDataset("test")
    for r in rows:
        run = tmp_path / "out" / f"{r['tokenizer']}-{r['interface']}"
        assert [int(row["step"]) for row in read_log(run)] == [1, 2, 3] and r["train steps"] == 3
        pipe = Pipeline.from_pretrained(run)  # the saved model, with the run's interface and the micro backbone
        assert pipe.model.config.image.interface == r["interface"] and pipe.model.config.backbone.hidden_size == 48
        images = generate_digits(pipe, 2, GenerationOptions(guidance=3.0), seed=0)  # (10, 2, 1, 8, 8)
        assert r["prompted acc"] == round(prompted_accuracy(images, classifier), 3)
        assert r["gen FWD"] == round(frechet_wavelet_distance(held_out.images, images.flatten(0, 1)), 3)
        save_image_grid(images, tmp_path / "again.png")
        assert (tmp_path / "again.png").read_bytes() == (run / "samples.png").read_bytes()  # the images it judged
        assert r["draw img/s"] > 0 and 0 <= r["caption acc"] <= 1
        if r["interface"] == "diffusion":  # captioning 297 digits again costs seconds: once is enough
            assert r["caption acc"] == round(caption_accuracy(pipe, held_out)[0], 3)
    mar = Pipeline.from_pretrained(tmp_path / "out" / "pixels-mar").model.config.image.head
    assert (mar.width, mar.depth, mar.repeat) == (128, 2, 2)  # digits-tiny's small MLP head


def test_bad_specs_fail_before_training(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not an image tokenizer directory"):
        parse_spec(str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as e:
        main(["compare-tokenizers", "pixels", "--data", "shapes", "--generation", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--data digits" in capsys.readouterr().err
