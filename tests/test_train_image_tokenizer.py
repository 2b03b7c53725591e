"""`mmgen train` with model.image.tokenizer.kind vae / vq / hybrid and no model.image_tokenizer: the run trains its
own image tokenizer on its data first (OUT/image_tokenizer), uses it frozen, and keeps it on resume."""

from __future__ import annotations

import json
import shutil
import tempfile

import pytest
import torch
from accelerate.utils import PrepareForLaunch, patch_environment
from safetensors.torch import load_file, save_file
from test_train_distributed import free_port
from torch.multiprocessing import start_processes
from train_helpers import micro_config, restore_threads  # noqa: F401 (autouse fixture)

from mmgen.data.sources import build_source
from mmgen.errors import CheckpointError, DataError
from mmgen.files import WEIGHTS_FILE
from mmgen.model import MMGenModel
from mmgen.train.config import SourceConfig, TrainConfig
from mmgen.train.overrides import build
from mmgen.train.tokenizer import IMAGE_TOKENIZER_DIR, images_of_sources
from mmgen.train.trainer import Trainer, run

VAE = {"kind": "vae", "downsample": 2, "latent_channels": 4, "width": 8}
BUDGET = {"steps": 6, "batch_size": 8, "max_images": 64}


def config(tmp_path, tokenizer, **sections) -> TrainConfig:
    (tmp_path / "tok").mkdir(exist_ok=True)
    tokenizer.save(tmp_path / "tok")
    raw = micro_config(tmp_path / "run", tmp_path / "tok", image_tokenizer=BUDGET, **sections)
    raw["model"]["image"] = {"patch_size": 1, "tokenizer": dict(VAE)}
    return build(TrainConfig, raw)


def test_run_trains_its_vae_on_the_data_first_and_keeps_it_frozen(tmp_path, tokenizer):
    out = run(config(tmp_path, tokenizer))
    directory = tmp_path / "run" / IMAGE_TOKENIZER_DIR
    summary = json.loads((directory / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["held_out_psnr"] > 0  # 64 images of the digits: 3 held out
    trained = load_file(directory / WEIGHTS_FILE)
    saved = json.loads((directory / "config.json").read_text())
    assert saved["kind"] == "vae" and saved["latent_scale"] != 1.0  # calibrated on the data's latents
    model = MMGenModel.from_pretrained(out)
    assert model.config.image.tokenizer.latent_scale == saved["latent_scale"]
    weights = model.image_tokenizer.state_dict()
    assert weights.keys() == trained.keys()
    for name, value in trained.items():  # the model's tokenizer is the one trained first, unchanged by training
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)


def test_resume_keeps_the_trained_tokenizer_and_is_exact(tmp_path, tokenizer):
    out = run(config(tmp_path, tokenizer))  # 4 steps, checkpoints at 2 and 4
    directory = out / IMAGE_TOKENIZER_DIR
    straight = load_file(out / WEIGHTS_FILE)
    tokenizer_bytes = (directory / WEIGHTS_FILE).read_bytes()
    resumed = Trainer(config(tmp_path, tokenizer, resume=str(out / "checkpoints" / "step_00000002")))
    assert resumed.step == 2
    resumed.fit()
    assert (directory / WEIGHTS_FILE).read_bytes() == tokenizer_bytes  # not trained again
    for name, value in load_file(out / WEIGHTS_FILE).items():
        torch.testing.assert_close(value, straight[name], rtol=0, atol=0, msg=name)

    shutil.rmtree(directory)
    with pytest.raises(CheckpointError, match="holds no finished one"):
        Trainer(config(tmp_path, tokenizer, resume="latest"))


def test_a_named_tokenizer_is_used_as_given(tmp_path, tokenizer):
    first = run(config(tmp_path, tokenizer, train={"steps": 2}))
    raw = micro_config(tmp_path / "second", tmp_path / "tok", train={"steps": 2})
    raw["model"]["image"] = {"patch_size": 1}
    raw["model"]["image_tokenizer"] = str(first / IMAGE_TOKENIZER_DIR)
    second = run(build(TrainConfig, raw))
    assert not (second / IMAGE_TOKENIZER_DIR).exists()
    assert MMGenModel.from_pretrained(second).config.image.tokenizer.kind == "vae"


def test_sources_without_images_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("only text here\nand more text\n")
    text = build_source(SourceConfig(kind="text", path=str(tmp_path / "a.txt"), text_unit="line"), seed=0,
                        channels=1, resolution=8, max_chars=1000)
    with pytest.raises(DataError, match="no images to train the image tokenizer on"):
        images_of_sources([text], limit=16, seed=0)
    digits = build_source(SourceConfig(kind="digits", limit=40), seed=0, channels=1, resolution=8, max_chars=1000)
    images = images_of_sources([text, digits], limit=16, seed=0)  # an even share: 8 from the digits
    assert images.shape == (8, 1, 8, 8) and images.min() >= -1 and images.max() <= 1


def _worker(cfg: TrainConfig, out_file: str) -> None:
    """One of two processes: build the Trainer (the VAE stage included) and save the tokenizer it got."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fork inherits the parent's single-process state
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    save_file(trainer.model.image_tokenizer.state_dict(), out_file.format(rank=trainer.rank))


def test_two_processes_train_the_tokenizer_once_and_share_it(tmp_path, tokenizer):
    cfg = config(tmp_path, tokenizer)
    with tempfile.NamedTemporaryFile() as rdv, patch_environment(
        world_size=2, master_addr="127.0.0.1", master_port=str(free_port()), accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=rdv.name, accelerate_use_cpu="yes", gloo_socket_ifname="lo",
    ):
        start_processes(PrepareForLaunch(_worker, debug=True), args=(cfg, str(tmp_path / "vae_{rank}.safetensors")),
                        nprocs=2, start_method="fork")
    trained = load_file(tmp_path / "run" / IMAGE_TOKENIZER_DIR / WEIGHTS_FILE)
    for rank in range(2):  # the waiting process loaded what the main one trained
        got = load_file(tmp_path / f"vae_{rank}.safetensors")
        assert got.keys() == trained.keys()
        for name, value in trained.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=f"rank {rank}: {name}")
