"""Image sets as one tensor (N, C, R, R) in [-1, 1]: what image tokenizers train and are compared on.

    digits    the bundled 8×8 digits: 1,500 train / 297 test
    shapes    procedural 3-channel shapes: 20,000 train / 1,000 test, from disjoint seeds
    a folder  image files found recursively; a fixed 10% (at most 500) is held out as "test"
Folder files go through `mmgen.data.images.load_image`, the resize and crop the model's training
data uses, so a tokenizer trains on the pixels the model will later see. Unreadable files are
skipped with one warning that counts them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmgen.data.images import load_image
from mmgen.errors import UnreadableImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SHAPES_SIZES = {"train": 20_000, "test": 1_000}


def load_images(source: str, split: str = "train", resolution: int | None = None, channels: int | None = None,
                limit: int | None = None) -> Tensor:
    """Images (N, C, R, R) float32 in [-1, 1] from "digits", "shapes" or an image folder.

    Args:
        source: "digits", "shapes", or a directory of image files (see the module docstring).
        split: "train" or "test".
        resolution: image side; digits are 8; shapes default to 32; folders to 64 (short side resized,
            then center-cropped).
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
        images = load_folder(Path(source), split, resolution or 64, channels or 3)
    return images[:limit] if limit else images


def split_files(directory: Path, split: str) -> list[Path]:
    """The image files of `split` under `directory`: a fixed seeded 10% (1 to 500 files) is "test"."""
    if not directory.is_dir():
        raise FileNotFoundError(f"image source {directory} is neither 'digits', 'shapes' nor a directory of images")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {directory}")
    order = np.random.default_rng(0).permutation(len(files))
    held = min(max(len(files) // 10, 1), 500) if len(files) > 1 else 0
    pick = order[:held] if split == "test" else order[held:]
    return [files[i] for i in sorted(pick)]


def load_folder(directory: Path, split: str, resolution: int, channels: int) -> Tensor:
    """The `split` images of a folder as (N, channels, resolution, resolution); unreadable files are
    skipped with one warning that counts them."""
    files = split_files(directory, split)
    out, bad = [], []
    for path in files:
        try:
            out.append(load_image(path, channels, resolution))  # (C, R, R)
        except UnreadableImage as e:
            bad.append(str(e))
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {directory} (first: {bad[0]})", stacklevel=3)
    if not out:
        raise ValueError(f"none of the {len(files)} {split} image files under {directory} could be read")
    return torch.stack(out)
