"""Train an image tokenizer (vae / vq / hybrid) on a tensor of images (see `mmgen.data.image_sets`).

AdamW (decay on conv weights only) with `mmgen.train.optim`'s warmup and cosine schedule, which
follows the clock under a time budget; a tqdm bar on a terminal, one log line every `log_every`
steps otherwise; periodic and final checkpoints through the atomic `save_pretrained` (each one
calibrated, so any checkpoint is usable); a reconstruction grid (originals above reconstructions)
and `train_log.jsonl` / `train_summary.json` in the output directory. `run_image_tokenizer` is the stage of
`mmgen train` that trains the run's own tokenizer on its data first (the `image_tokenizer` config section).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmgen.config import ImageTokenizerConfig
from mmgen.data.source import UnreadableItem
from mmgen.errors import CheckpointError, ConfigError, DataError
from mmgen.files import atomic_write, save_image_grid, write_json
from mmgen.metrics import code_statistics_of, psnr
from mmgen.tokenizers.image import ImageTokenizer, build_image_tokenizer, reconstruct
from mmgen.train.optim import lr_at, param_groups

# Per-source defaults: image format, tokenizer shape and a training budget that fits a few CPU-minutes.
DATA_DEFAULTS: dict[str, dict] = {
    "digits": dict(channels=1, resolution=8, downsample=2, latent_channels=4, codebook_size=128, width=32,
                   res_blocks=1, steps=2000, batch_size=128, lr=2e-3),
    "shapes": dict(channels=3, resolution=32, downsample=4, latent_channels=4, codebook_size=512, width=16,
                   res_blocks=1, steps=1800, batch_size=32, lr=1e-3),
    "folder": dict(channels=3, resolution=64, downsample=8, latent_channels=4, codebook_size=1024, width=32,
                   res_blocks=1, steps=3000, batch_size=32, lr=1e-3),
}
SUMMARY_FILE = "train_summary.json"
MIN_LR_RATIO = 0.1  # the cosine decays to a tenth of the peak rate
WEIGHT_DECAY = 1e-4


def source_defaults(source: str) -> dict:
    """Defaults for "digits", "shapes", or an image folder (any other string)."""
    return dict(DATA_DEFAULTS[source if source in ("digits", "shapes") else "folder"])


def source_images(source: str, split: str = "train", resolution: int | None = None, channels: int | None = None,
                  limit: int | None = None) -> Tensor:
    """`mmgen.data.image_sets.load_images`, its errors (a missing folder, no readable images, a resolution
    the source cannot give) raised as `DataError` naming the source."""
    from mmgen.data.image_sets import load_images

    try:
        return load_images(source, split, resolution, channels, limit=limit)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"--data {source}: {e}") from None


def tokenizer_config(**fields) -> ImageTokenizerConfig:
    """`ImageTokenizerConfig(**fields)`, a ValueError raised as `ConfigError` (the fields come from options)."""
    try:
        return ImageTokenizerConfig(**fields)
    except ValueError as e:
        raise ConfigError(f"image tokenizer: {e}") from None


def conv_weights(name: str, p: nn.Parameter) -> bool:
    """The tokenizer's weight-decay rule: conv kernels decay; biases, norms and the codebook do not."""
    return p.dim() == 4


def train_image_tokenizer(
    config: ImageTokenizerConfig,
    images_dataset: Tensor | Dataset,
    out_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_minutes: float | None = None,
    seed: int = 0,
    progress: bool = True,
    eval_images: Tensor | None = None,
    save_every: int = 500,
    log_every: int = 50,
    warmup: int = 100,
    device: str | torch.device = "cpu",
) -> tuple[ImageTokenizer, list[dict]]:
    """Train a tokenizer of `config.kind` on images in [-1, 1]; save it to `out_dir`.

    Args:
        config: the tokenizer (copied; calibration writes latent_shift / latent_scale into the copy).
        images_dataset: training images (N, C, R, R), or a Dataset of images / (image, caption) pairs.
        out_dir: where checkpoints, the grid PNG and the logs go.
        steps: optimizer steps (the cosine schedule spans them).
        batch_size, lr, seed: the usual.
        max_minutes: stop after this much wall-clock time; the schedule then follows the clock
            (it is at step max(step, steps · elapsed / budget)) so the decay still completes.
        progress: show a tqdm bar on a terminal; print a line every `log_every` steps otherwise.
        eval_images: held-out images for the final PSNR and the grid (default: 8 training images).
        save_every: checkpoint period in steps.
        warmup: linear warmup steps.
        device: where the tokenizer trains (the images stay where they are; each batch moves).
    Returns: (the trained tokenizer in eval mode, the list of logged records).
    """
    images = _as_tensor(images_dataset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = _trainable(dataclasses.replace(config), images).to(device)
    opt = torch.optim.AdamW(param_groups(tokenizer, WEIGHT_DECAY, conv_weights), lr=lr, betas=(0.9, 0.99))
    calib = images[torch.randperm(len(images), generator=gen)[:2048]]
    show = (eval_images if eval_images is not None else images)[:8]
    budget = max_minutes * 60 if max_minutes else math.inf
    log = _Log(out / "train_log.jsonl", steps, log_every, progress, config.kind)
    start, step, stop = time.perf_counter(), 0, False
    while step < steps and not stop:
        rate = lr_at(max(step, int(steps * (time.perf_counter() - start) / budget)), lr, warmup, steps, MIN_LR_RATIO)
        batch = images[torch.randint(len(images), (batch_size,), generator=gen)].to(device)  # (B, C, R, R)
        parts = _step(tokenizer, opt, batch, rate, step)
        step += 1
        stop = time.perf_counter() - start >= budget
        log.add(step, rate, parts, force=step == steps or stop)
        if step % save_every == 0 and step < steps and not stop:
            _checkpoint(tokenizer, calib, show, out)
    log.close()
    minutes = round((time.perf_counter() - start) / 60, 2)
    _finish(tokenizer, calib, show, out, eval_images, {"kind": config.kind, "steps": step, "minutes": minutes,
            "batch_size": batch_size, "lr": lr, "final": log.records[-1] if log.records else {}})
    return tokenizer, log.records


def _step(tokenizer: ImageTokenizer, opt: torch.optim.Optimizer, batch: Tensor, rate: float, step: int) -> dict:
    """One AdamW step at learning rate `rate` on a batch (B, C, R, R), gradients clipped to norm 1; the loss parts."""
    for group in opt.param_groups:
        group["lr"] = rate
    parts = tokenizer.loss(batch, step)
    opt.zero_grad(set_to_none=True)
    parts["loss"].backward()
    torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), 1.0)
    opt.step()
    return parts


def _trainable(config: ImageTokenizerConfig, images: Tensor) -> ImageTokenizer:
    """A fresh tokenizer in training mode; raises if its kind is not trainable or `images` do not fit it."""
    try:
        tokenizer = build_image_tokenizer(config)
        tokenizer.check_images(images[:1])
    except ValueError as e:
        raise ConfigError(f"image tokenizer {config.kind!r}: {e}") from None
    if not hasattr(tokenizer, "calibrate") or type(tokenizer).loss is ImageTokenizer.loss:
        raise ConfigError(f"the {config.kind!r} image tokenizer is not trainable; train 'vae', 'vq' or 'hybrid'")
    return tokenizer.train()


def _checkpoint(tokenizer: ImageTokenizer, calib: Tensor, show: Tensor, out: Path) -> None:
    """Calibrate, save the tokenizer and its reconstruction grid (originals above), back to training mode."""
    tokenizer.eval()
    tokenizer.calibrate(calib.to(tokenizer.device))
    tokenizer.save_pretrained(out)
    save_image_grid(torch.stack([show, reconstruct(tokenizer, show)]), out / "reconstructions.png")
    tokenizer.train()


def _finish(tokenizer: ImageTokenizer, calib: Tensor, show: Tensor, out: Path, eval_images: Tensor | None,
            summary: dict) -> None:
    """The final checkpoint, in eval mode, then OUT/train_summary.json (`summary` plus the held-out figures),
    written last: its presence says the training finished (`run_image_tokenizer` waits on it)."""
    _checkpoint(tokenizer, calib, show, out)
    tokenizer.eval()
    if eval_images is not None:
        summary.update(_held_out(tokenizer, eval_images))
    write_json(out / SUMMARY_FILE, summary)


def _held_out(tokenizer: ImageTokenizer, images: Tensor) -> dict:
    """PSNR on held-out images, and codebook usage / perplexity for discrete kinds."""
    out = {"held_out_psnr": round(float(psnr(reconstruct(tokenizer, images), images).mean()), 3)}
    if tokenizer.config.discrete:
        out.update(code_statistics_of(tokenizer, images))
    return out


class _Log:
    """Averages of the loss parts over `log_every` steps, appended to a JSONL file (emptied first) and
    shown on a tqdm bar (terminal) or as stderr lines."""

    def __init__(self, path: Path, steps: int, log_every: int, progress: bool, kind: str):
        from tqdm.auto import tqdm

        self.path, self.log_every, self.progress = path, log_every, progress
        self.tty = progress and sys.stderr.isatty()
        self.bar = tqdm(total=steps, desc=f"train {kind}", disable=not self.tty, dynamic_ncols=True)
        self.records: list[dict] = []
        self.sums: dict[str, float] = {}
        self.start = time.perf_counter()
        atomic_write(path, "")

    def add(self, step: int, lr: float, parts: dict[str, Tensor], force: bool = False) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.bar.update(1)
        if step % self.log_every and not force:
            return
        n = (step - 1) % self.log_every + 1
        record = {"step": step, "seconds": round(time.perf_counter() - self.start, 1), "lr": lr,
                  **{k: round(v / n, 5) for k, v in self.sums.items()}}
        self.sums = {}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tty:
            self.bar.set_postfix({k: record[k] for k in ("loss", "usage", "perplexity") if k in record})
        elif self.progress:
            print(" ".join(f"{k}={v}" for k, v in record.items()), file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _as_tensor(images: Tensor | Dataset) -> Tensor:
    """A Tensor (N, C, R, R) from a Tensor or a Dataset of images / (image, caption) pairs."""
    if isinstance(images, Tensor):
        return images.float()
    items = [images[i] for i in range(len(images))]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()


# -- the image tokenizer of a training run ------------------------------------------------------------------------

TRAINED_HERE = ("vae", "vq", "hybrid")  # model.image.tokenizer kinds `mmgen train` trains first when none is given
IMAGE_TOKENIZER_DIR = "image_tokenizer"  # under OUT


def trains_image_tokenizer(model_section, config: ImageTokenizerConfig) -> bool:
    """Whether a run trains its image tokenizer first: the config asks for a trainable kind and names no
    trained one (`model.image_tokenizer`)."""
    return config.kind in TRAINED_HERE and not model_section.image_tokenizer


def images_of_sources(sources: list, limit: int, seed: int) -> Tensor:
    """(N, C, R, R): up to `limit` images from the sources' items, an even share from each, in a seeded order.
    An item that cannot be read is skipped; a source is left once its share is drawn or 4× its share of items
    were tried (a text-only source gives none)."""
    rng, per, images = random.Random(seed), max(1, limit // max(1, len(sources))), []
    for src in sources:
        order, got, tried = list(range(len(src))), 0, 0
        rng.shuffle(order)
        for i in order:
            if got >= per or tried >= 4 * per:
                break
            tried += 1
            try:
                found = [s for s in src.sample(i, rng) if isinstance(s, Tensor)][: per - got]
            except UnreadableItem:
                continue
            images += found
            got += len(found)
    if not images:
        raise DataError("the data sources hold no images to train the image tokenizer on (model.image.tokenizer.kind "
                        "vae, vq or hybrid is trained first on them); add an image source, or give a trained one as "
                        "model.image_tokenizer=DIR")
    return torch.stack(images).float()


def run_image_tokenizer(section, config: ImageTokenizerConfig, sources: list, out: Path, resume: bool, main: bool,
                        barrier: Callable[[], None], seed: int = 0, device: str | torch.device = "cpu") -> Path:
    """The image tokenizer of a training run that names none: trained on the main process from the sources'
    images into OUT/image_tokenizer (replacing what is there) while the others wait; on resume, the one the run
    trained at its start. Returns its directory, for `model.image_tokenizer`. Progress: a bar on a terminal, a
    line every 50 steps otherwise.

    Args:
        section: the config's `ImageTokenizerTraining` (steps, batch_size, lr, max_minutes, max_images).
        config: the tokenizer to train (`model.image.tokenizer`, resolved: kind, format and shape).
        resume: whether the run resumes a checkpoint (whose model holds this tokenizer).
    Raises:
        CheckpointError: on resume, when OUT/image_tokenizer holds no finished tokenizer.
        DataError: the sources hold no image.
    """
    directory = out / IMAGE_TOKENIZER_DIR
    if resume:
        if not (directory / SUMMARY_FILE).is_file():
            raise CheckpointError(f"--resume: this run trains its image tokenizer ({config.kind}) first, and "
                                  f"{directory} holds no finished one; restore it, or start afresh (--overwrite=true)")
        return directory
    if main:
        shutil.rmtree(directory, ignore_errors=True)
    barrier()  # no process can see an earlier run's tokenizer from here on
    if not main:  # wait on the file, not in a collective, which would time out (30 min) under a long budget; a
        while not (directory / SUMMARY_FILE).is_file():  # launcher (accelerate, torchrun) stops us if main fails
            time.sleep(2)
        return directory
    images = images_of_sources(sources, section.max_images, seed)  # (N, C, R, R)
    held = min(256, len(images) // 20)
    print(f"image tokenizer: training a {config.kind} ({config.grid}×{config.grid} latent cells per image) on "
          f"{len(images) - held} images of the data ({held} held out) for {section.steps} steps"
          f"{f' or {section.max_minutes:g} min' if section.max_minutes else ''} -> {directory}", flush=True)
    train_image_tokenizer(config, images[held:], directory, steps=section.steps, batch_size=section.batch_size,
                          lr=section.lr, max_minutes=section.max_minutes or None, seed=seed,
                          eval_images=images[:held] if held else None, device=device)
    summary = json.loads((directory / SUMMARY_FILE).read_text())
    psnr_note = f", held-out PSNR {summary['held_out_psnr']} dB" if "held_out_psnr" in summary else ""
    print(f"image tokenizer: {summary['steps']} steps in {summary['minutes']} min{psnr_note}", flush=True)
    return directory
