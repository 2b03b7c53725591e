"""Image files and tensors -> (C, R, R) float tensors in [-1, 1] at the model's format.

Files: convert to grey or RGB, resize the short side to R (bicubic), center-crop to R×R.
Tensors (the bundled datasets): convert channels (grey <-> RGB) and resize when R differs.
`load_image` raises `UnreadableImage` for a missing, truncated or non-image file, so the data
pipeline can skip that item and count it instead of stopping the run.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


class UnreadableImage(Exception):
    """An image that cannot be used (missing, corrupt, unsupported); the message names it."""


def fit_pil(image: Image.Image, channels: int, resolution: int) -> Tensor:
    """PIL image -> (channels, resolution, resolution) in [-1, 1]: short side resized, center-cropped."""
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if (w, h) != (resolution, resolution):
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr  # (R, R, C)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def fit_tensor(image: Tensor, channels: int, resolution: int) -> Tensor:
    """(C, H, W) in [-1, 1] -> (channels, resolution, resolution): grey <-> RGB, bilinear resize + crop."""
    c = image.shape[0]
    if c != channels:
        if c == 1:
            image = image.expand(channels, -1, -1)
        elif channels == 1 and c == 3:
            image = (image * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        else:
            raise ValueError(f"cannot convert {c}-channel images to {channels} channels")
    h, w = image.shape[1:]
    if (h, w) != (resolution, resolution):
        s = resolution / min(h, w)
        size = (max(resolution, round(h * s)), max(resolution, round(w * s)))
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image[:, top : top + resolution, left : left + resolution]
    return image.clamp(-1, 1).contiguous()


def load_image(source: str | Path | bytes | Image.Image, channels: int, resolution: int) -> Tensor:
    """A path, encoded bytes or PIL image -> (channels, resolution, resolution) in [-1, 1].

    Raises:
        UnreadableImage: the file is missing or cannot be decoded.
    """
    if isinstance(source, Image.Image):
        try:
            return fit_pil(source, channels, resolution)
        except (OSError, ValueError) as e:
            raise UnreadableImage(f"cannot decode image: {e}") from None
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return fit_pil(im, channels, resolution)
    except FileNotFoundError:
        raise UnreadableImage(f"{name}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
