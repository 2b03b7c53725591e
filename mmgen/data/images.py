"""Image files and tensors -> (C, R, R) float tensors in [-1, 1] at the model's format.

Files and PIL images are shrunk by whole factors while the short side stays at least R (JPEGs while
decoding, by `draft`; others by `reduce`); an image with more than MAX_PIXELS pixels to decode is
refused before decoding. Files, PIL images and RGBA arrays go through one conversion rule to 8-bit
grey or RGB (`to_grey_or_rgb`: EXIF orientation applied, 16-bit scaled by its range, transparency over
white) and become tensors; every tensor is checked (finite, within [-1, 1]), then resized (short side
to R, bilinear with antialiasing) and center-cropped to R×R (`fit_tensor`).
`load_image` raises `UnreadableImage` for a missing, truncated, too large or non-image file, so the
data pipeline can skip that item and count it instead of stopping the run.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from mmgen.errors import UnreadableImage

MAX_ASPECT = 4.0  # a longer side over 4× the shorter one would lose most of the image to the center crop
MAX_PIXELS = 64_000_000  # the most pixels decoded for one image (256 MB as RGBA); a JPEG counts at its draft scale
RANGE_TOLERANCE = 1e-3  # tensors may overshoot [-1, 1] by this much (resampling error) and are clamped
REDUCIBLE = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr")  # the modes PIL's `Image.reduce` takes
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")  # modes with an alpha channel (La, RGBa: premultiplied)
WIDE_GREY = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}  # full scale


def check_size(width: int, height: int, name: str = "image") -> None:
    """Raise `UnreadableImage` for an image too small or too elongated to resize and center-crop."""
    if min(width, height) < 2:
        raise UnreadableImage(f"{name} is {width}×{height} pixels: images need at least 2 pixels on each side")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UnreadableImage(f"{name} is {width}×{height} pixels: an aspect ratio over {MAX_ASPECT:g}:1 would lose "
                              "most of it to the center crop; crop it closer to square first")


def check_pixels(width: int, height: int, name: str = "image") -> None:
    """Raise `UnreadableImage` for an image with more than MAX_PIXELS pixels to decode."""
    if width * height > MAX_PIXELS:
        raise UnreadableImage(f"{name} is {width}×{height} pixels to decode ({width * height / 1e6:.0f} megapixels), "
                              f"over the limit of {MAX_PIXELS / 1e6:g} megapixels (MAX_PIXELS): downscale it first, "
                              "e.g. with PIL's Image.thumbnail")


def fit_pil(image: Image.Image, channels: int, resolution: int) -> Tensor:
    """PIL image -> (channels, resolution, resolution) in [-1, 1]: shrunk by a whole factor while its
    short side stays at least `resolution`, converted by `to_grey_or_rgb`, then resized and
    center-cropped like a tensor (`fit_tensor`), so files, arrays and tensors all meet the model
    through one resampling rule."""
    check_size(*image.size)
    check_pixels(*image.size)
    factor = min(image.size) // resolution
    if factor >= 2 and image.mode in REDUCIBLE:
        image = image.reduce(factor)
    return fit_array(np.asarray(to_grey_or_rgb(image, channels), dtype=np.uint8), channels, resolution)


def to_grey_or_rgb(image: Image.Image, channels: int) -> Image.Image:
    """The conversion every image mmgen reads goes through (files, PIL images, RGBA arrays): to 8-bit
    L (`channels` 1) or RGB (`channels` 3), by one rule:

        orientation   turned upright by its EXIF orientation tag (`ImageOps.exif_transpose`);
        wide grey     I;16 (16-bit PNG) and I taken as 0..65535, F as 0..1, scaled to 0..255 and clipped:
                      the same scale for every image, so a dark 16-bit image stays dark;
        transparency  RGBA, LA, PA, La, RGBa, and any mode with a transparency key (P, L, RGB): composited
                      over white, so a transparent pixel becomes white (`over_white`);
        the rest      1, L, P, RGB, CMYK, YCbCr: PIL's `convert` (RGB -> L by the ITU-R 601-2 luma).

    Raises:
        UnreadableImage: an F image holds NaN or infinite pixels.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_GREY:
        arr = np.asarray(image, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise UnreadableImage(f"the {image.mode} image holds NaN or infinite pixels: give finite values")
        image = Image.fromarray(np.clip(arr * (255.0 / WIDE_GREY[image.mode]), 0, 255).round().astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        image = over_white(image)
    return image.convert("L" if channels == 1 else "RGB")


def over_white(image: Image.Image) -> Image.Image:
    """An image with transparency -> RGB composited over an opaque white background."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def fit_array(array: np.ndarray, channels: int, resolution: int) -> Tensor:
    """uint8 (H, W) or (H, W, C) with C in 1, 3, 4 -> (channels, resolution, resolution) in [-1, 1]."""
    if array.dtype != np.uint8:
        raise UnreadableImage(f"numpy images must be uint8 (H, W[, C]) in 0..255, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise UnreadableImage(f"numpy images must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    check_size(array.shape[1], array.shape[0])
    if array.shape[-1] == 4:  # RGBA: the one conversion rule (`to_grey_or_rgb`), alpha over white
        array = np.asarray(to_grey_or_rgb(Image.fromarray(array), 3))
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
    return fit_tensor(x, channels, resolution)


def fit_tensor(image: Tensor, channels: int, resolution: int) -> Tensor:
    """Float (C, H, W) in [-1, 1] -> float32 (channels, resolution, resolution): checked (`check_range`),
    grey <-> RGB, bilinear resize + crop, clamped to [-1, 1]. A [0, 1] tensor lies within range and
    is taken as it is: a dim image; convert it with x * 2 - 1."""
    if image.ndim != 3 or not image.is_floating_point():
        fix = "; convert 0..255 pixels with x.float() / 127.5 - 1" if not image.is_floating_point() else ""
        raise UnreadableImage(f"image tensors must be float (C, H, W) in [-1, 1], got {image.dtype} of shape "
                              f"{tuple(image.shape)}{fix}")
    check_size(image.shape[2], image.shape[1])
    c = image.shape[0]
    if c != channels and not (c == 1 or (channels == 1 and c == 3)):
        raise UnreadableImage(f"cannot convert a {c}-channel image to {channels} channels (give 1 or 3 channels)")
    check_range(image)
    image = image.float()
    if c != channels:
        image = image.expand(channels, -1, -1) if c == 1 else (
            image * torch.tensor([0.299, 0.587, 0.114], device=image.device)[:, None, None]).sum(0, keepdim=True)
    h, w = image.shape[1:]
    if (h, w) != (resolution, resolution):
        s = resolution / min(h, w)
        size = (max(resolution, round(h * s)), max(resolution, round(w * s)))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image[:, top : top + resolution, left : left + resolution]
    return image.clamp(-1, 1).contiguous()


def check_range(image: Tensor) -> None:
    """Raise `UnreadableImage` unless every value of `image` is finite and within [-1, 1] (up to
    RANGE_TOLERANCE); the message says what range the values seem to be in and how to convert."""
    finite = torch.isfinite(image)
    if not finite.all():
        raise UnreadableImage(f"the image tensor holds {int((~finite).sum())} NaN or infinite value(s): pixels must "
                              "be finite numbers in [-1, 1]; check what produced them")
    lo, hi = image.min().item(), image.max().item()
    if lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE:
        return
    if lo >= -RANGE_TOLERANCE and hi <= 1.1:
        guess = "they look like [0, 1] values overshooting a little: convert with (x * 2 - 1).clamp(-1, 1)"
    elif lo >= -RANGE_TOLERANCE and hi <= 255 + RANGE_TOLERANCE:
        guess = "they look like 0..255 pixels: convert with x / 127.5 - 1"
    else:
        guess = "rescale them (x / 127.5 - 1 for 0..255 pixels, x * 2 - 1 for [0, 1])"
    raise UnreadableImage(f"the image tensor's values lie in [{lo:.4g}, {hi:.4g}], outside [-1, 1]: {guess}")


ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray, Tensor]


def load_image(source: ImageInput, channels: int, resolution: int) -> Tensor:
    """A path, encoded bytes, PIL image, uint8 array (H, W[, C]) or float tensor (C, H, W) in [-1, 1]
    -> (channels, resolution, resolution) in [-1, 1].

    Raises:
        UnreadableImage: the file is missing or cannot be decoded, or the image has an unsupported
            type, mode, dtype, size or range of values (see `check_range`), or more than MAX_PIXELS
            pixels; the message names the image and the problem.
    """
    if isinstance(source, Tensor):
        return fit_tensor(source, channels, resolution)
    if isinstance(source, np.ndarray):
        return fit_array(source, channels, resolution)
    if isinstance(source, Image.Image):
        try:
            return fit_pil(source, channels, resolution)
        except (OSError, ValueError) as e:
            if isinstance(e, UnreadableImage):
                raise
            raise UnreadableImage(f"cannot convert the {source.mode} image: {e}") from None
    if not isinstance(source, (str, Path, bytes)):
        raise UnreadableImage(f"unsupported image type {type(source).__name__}: give a file path, bytes, a PIL "
                              "image, a uint8 numpy array or a float tensor (C, H, W) in [-1, 1]")
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with _open(source) as im:
            im.draft(None, (resolution, resolution))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, each side >= R
            check_pixels(*im.size)
            im.load()  # decode now: a truncated file fails here, not later
            return fit_pil(im, channels, resolution)
    except FileNotFoundError:
        raise UnreadableImage(f"{name}: file not found") from None
    except UnreadableImage as e:
        raise UnreadableImage(f"{name}: {e}") from None
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"{name}: too large to decode ({e}); downscale it first, e.g. with PIL's "
                              "Image.thumbnail") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UnreadableImage(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def _open(source: str | Path | bytes) -> Image.Image:
    """Open without decoding; PIL's decompression-bomb warning is left to MAX_PIXELS (checked after `draft`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
