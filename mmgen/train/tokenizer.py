"""Train an image tokenizer (vae / vq / hybrid) on the bundled digits, shapes, or an image folder.

AdamW with warmup and cosine decay; a tqdm bar on a terminal, one log line every `log_every`
steps otherwise; periodic and final checkpoints through the atomic `save_pretrained` (each one
calibrated, so any checkpoint is usable); a reconstruction grid (originals above reconstructions)
and `train_log.jsonl` / `train_summary.json` in the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmgen.compare import code_statistics_of, psnr, reconstruct, save_image_grid
from mmgen.config import ImageTokenizerConfig
from mmgen.tokenizers.image import ImageTokenizer, build_image_tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Per-source defaults: image format, tokenizer shape and a training budget that fits a few CPU-minutes.
DATA_DEFAULTS: dict[str, dict] = {
    "digits": dict(channels=1, resolution=8, downsample=2, latent_channels=4, codebook_size=128, width=32,
                   res_blocks=1, steps=2000, batch_size=128, lr=2e-3),
    "shapes": dict(channels=3, resolution=32, downsample=4, latent_channels=4, codebook_size=512, width=16,
                   res_blocks=1, steps=1800, batch_size=32, lr=1e-3),
    "folder": dict(channels=3, resolution=64, downsample=8, latent_channels=4, codebook_size=1024, width=32,
                   res_blocks=1, steps=3000, batch_size=32, lr=1e-3),
}
SHAPES_SIZES = {"train": 20_000, "test": 1_000}


def source_defaults(source: str) -> dict:
    """Defaults for "digits", "shapes", or an image folder (any other string)."""
    return dict(DATA_DEFAULTS[source if source in ("digits", "shapes") else "folder"])


def load_images(source: str, split: str = "train", resolution: int | None = None, channels: int | None = None,
                limit: int | None = None) -> Tensor:
    """Images (N, C, R, R) float32 in [-1, 1] from "digits", "shapes" or an image folder.

    Args:
        source: "digits" (1,500 train / 297 test real 8×8 digits), "shapes" (procedural 3-channel shapes,
            20,000 train / 1,000 test, disjoint seeds), or a directory of PNG/JPEG files (searched
            recursively; a fixed 10% (at most 500) is held out as "test"; unreadable files are skipped
            with one warning that counts them).
        split: "train" or "test".
        resolution: image side; digits are 8; shapes default to 32; folders to 64 (resize the short
            side, then center-crop).
        channels: folders only: 3 (RGB, default) or 1 (grey).
        limit: keep at most this many images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "digits":
        if resolution not in (None, 8):
            raise ValueError(f"the bundled digits are 8×8; got resolution={resolution} (use --resolution 8)")
        from mmgen.data.digits import DigitsDataset

        images = DigitsDataset(split).images  # (N, 1, 8, 8)
    elif source == "shapes":
        from mmgen.data.shapes import ShapesDataset

        n = min(limit or SHAPES_SIZES[split], SHAPES_SIZES[split]) if split == "test" else (limit or SHAPES_SIZES[split])
        ds = ShapesDataset(size=n, resolution=resolution or 32, seed=0 if split == "train" else 1)
        images = torch.stack([ds[i][0] for i in range(n)])  # (N, 3, R, R)
    else:
        images = _load_folder(Path(source), split, resolution or 64, channels or 3)
    return images[:limit] if limit else images


def _load_folder(directory: Path, split: str, resolution: int, channels: int) -> Tensor:
    from PIL import Image

    if not directory.is_dir():
        raise FileNotFoundError(f"image source {directory} is neither 'digits', 'shapes' nor a directory of images")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no PNG/JPEG files under {directory}")
    order = np.random.default_rng(0).permutation(len(files))
    held = min(max(len(files) // 10, 1), 500) if len(files) > 1 else 0
    pick = order[:held] if split == "test" else order[held:]
    out, bad = [], []
    for i in sorted(pick):
        try:
            with Image.open(files[i]) as im:
                im = im.convert("RGB" if channels == 3 else "L")
                s = resolution / min(im.size)
                im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))),
                               Image.Resampling.BICUBIC)
                left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
                arr = np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - any unreadable or corrupt file is skipped and counted
            bad.append(f"{files[i].name}: {e}")
            continue
        arr = arr[..., None] if arr.ndim == 2 else arr  # (R, R, C)
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)  # (C, R, R)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {directory} (first: {bad[0]})", stacklevel=3)
    if not out:
        raise ValueError(f"none of the {len(pick)} {split} image files under {directory} could be read")
    return torch.stack(out)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv weights only (not on biases, norms or the codebook)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 4 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
) -> tuple[ImageTokenizer, list[dict]]:
    """Train a tokenizer of `config.kind` on images in [-1, 1]; save it to `out_dir`.

    Args:
        config: the tokenizer (copied; calibration writes latent_shift / latent_scale into the copy).
        images_dataset: training images (N, C, R, R), or a Dataset of images / (image, caption) pairs.
        out_dir: where checkpoints, the grid PNG and the logs go.
        steps: optimizer steps (the cosine schedule spans them).
        batch_size, lr, seed: the usual.
        max_minutes: stop after this much wall-clock time; the schedule then follows the clock
            (progress = max(step / steps, elapsed / budget)) so the decay still completes.
        progress: show a tqdm bar on a terminal; print a line every `log_every` steps otherwise.
        eval_images: held-out images for the final PSNR and the grid (default: 8 training images).
        save_every: checkpoint period in steps.
        warmup: linear warmup steps.
    Returns: (the trained tokenizer in eval mode, the list of logged records).
    """
    from tqdm.auto import tqdm

    images = _as_tensor(images_dataset)
    config = dataclasses.replace(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = build_image_tokenizer(config)
    tokenizer.check_images(images[:1])
    if not hasattr(tokenizer, "calibrate") or type(tokenizer).loss is ImageTokenizer.loss:
        raise ValueError(f"the {config.kind!r} image tokenizer is not trainable; train 'vae', 'vq' or 'hybrid'")
    tokenizer.train()
    opt = torch.optim.AdamW(_param_groups(tokenizer, 1e-4), lr=lr, betas=(0.9, 0.99))
    calib = images[torch.randperm(len(images), generator=gen)[:2048]]
    show = (eval_images if eval_images is not None else images)[:8]
    budget = max_minutes * 60 if max_minutes else math.inf
    tty = progress and sys.stderr.isatty()
    bar = tqdm(total=steps, desc=f"train {config.kind}", disable=not tty, dynamic_ncols=True)
    log: list[dict] = []
    sums: dict[str, float] = {}
    start = time.perf_counter()
    step = 0
    log_path = out / "train_log.jsonl"
    log_path.write_text("")

    def checkpoint() -> None:
        tokenizer.eval()
        tokenizer.calibrate(calib)
        tokenizer.save_pretrained(out)
        save_image_grid(torch.stack([show, reconstruct(tokenizer, show)]), out / "reconstructions.png")
        tokenizer.train()

    while step < steps:
        frac = max(step / steps, (time.perf_counter() - start) / budget)
        scale = min(1.0, (step + 1) / max(warmup, 1)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        parts = tokenizer.loss(x, step)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), 1.0)
        opt.step()
        step += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.update(1)
        elapsed = time.perf_counter() - start
        stop = elapsed >= budget
        if step % log_every == 0 or step == steps or stop:
            n = (step - 1) % log_every + 1
            record = {"step": step, "seconds": round(elapsed, 1), "lr": lr * scale,
                      **{k: round(v / n, 5) for k, v in sums.items()}}
            sums = {}
            log.append(record)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if tty:
                bar.set_postfix({k: record[k] for k in ("loss", "usage", "perplexity") if k in record})
            elif progress:
                print(" ".join(f"{k}={v}" for k, v in record.items()), file=sys.stderr, flush=True)
        if step % save_every == 0 and step < steps and not stop:
            checkpoint()
        if stop:
            break
    bar.close()
    checkpoint()
    tokenizer.eval()
    summary = {"kind": config.kind, "steps": step, "minutes": round((time.perf_counter() - start) / 60, 2),
               "batch_size": batch_size, "lr": lr, "final": log[-1] if log else {}}
    if eval_images is not None:
        with torch.inference_mode():
            recon = reconstruct(tokenizer, eval_images)
            summary["held_out_psnr"] = round(float(psnr(recon, eval_images).mean()), 3)
            if config.discrete:
                summary.update(code_statistics_of(tokenizer, eval_images))
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return tokenizer, log


def _as_tensor(images: Tensor | Dataset) -> Tensor:
    """A Tensor (N, C, R, R) from a Tensor or a Dataset of images / (image, caption) pairs."""
    if isinstance(images, Tensor):
        return images.float()
    items = [images[i] for i in range(len(images))]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()
