"""Read the objects of a shapes image back (`mmgen.data.shapes`): what is drawn in each cell of the 3×3 grid.

    from mmgen.shape_judge import ShapeJudge
    judge = ShapeJudge(16)                  # fits its shape classifier once (seeded, about a second at 16×16)
    judge.objects(image)                    # [ShapeObject('red', 'circle', 'left'), ...] in POSITIONS order
    judge.shape([image, ...])               # ['circle', ...]: whole single-object images
    judge.holdout_accuracy                  # the classifier on 600 held-out real single-object shapes

Every image is first converted, once, to uint8 pixels (H, W, 3) (`to_pixels`: a PIL image, a uint8
array or a float tensor (3, H, W) in [-1, 1]) at the judge's resolution. A cell holds an object when
at least `min_bright(resolution)` of its pixels are bright (max channel > BRIGHT_THRESHOLD); its color is
`classify_color` of the cell's pixels, its shape the SVM's prediction on the image with everything
outside the cell set to black. The SVM (an RBF SVC, C = 10) is fit on the brightness masks (max
channel / 255, (H·W,)) of 3,000 single-object `ShapesDataset` renders (seed 100), as
`benchmarks/chat_model.py` has always judged shapes. Real renders are read exactly (4,000 edit scenes at
16×16 and at 32×32); the one miss seen in 6,000 two-object scenes at 16×16 was a circle read as a square:
the square above it blurs into the top pixel row of the circle's cell (dim, but in the masked image).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mmgen.data.images import to_grey_or_rgb
from mmgen.data.shapes import _CELLS, BRIGHT_THRESHOLD, POSITIONS, SHAPES, ShapeObject, ShapesDataset, classify_color
from mmgen.pipeline import to_pil

ImageLike = Image.Image | np.ndarray | torch.Tensor

# A cell holds an object when this fraction of the image's pixels (R², not the cell's) is bright in it.
# The smallest object, a triangle at 90% of OBJECT_SIZE (0.28), covers 0.9² · 0.28² / 2 ≈ 0.032 R² pixels; real
# renders (1,500 edits, before and after, at 8 to 64 pixels) have at least 0.015 R² bright pixels in an
# occupied cell (5 at 16×16, 28 at 32×32) and none at all in an empty one. 0.01 R² (3 pixels at 16×16,
# 10 at 32×32), about a third of the smallest object, keeps a partly drawn object and drops a model's
# stray bright pixels.
MIN_BRIGHT_FRACTION = 0.01
TRAIN_IMAGES, TRAIN_SEED = 3000, 100
HOLDOUT_IMAGES, HOLDOUT_SEED = 600, 101


def min_bright(resolution: int) -> int:
    """Bright pixels a cell needs to hold an object: MIN_BRIGHT_FRACTION of R², at least 1."""
    return max(1, round(MIN_BRIGHT_FRACTION * resolution * resolution))


def to_pixels(image: ImageLike) -> np.ndarray:
    """One image -> uint8 (H, W, 3): a PIL image (any mode, by mmgen's one conversion rule: transparency
    over white, `mmgen.data.images.to_grey_or_rgb`), a uint8 array (H, W, 3), or a float tensor (3, H, W)
    in [-1, 1] (x -> round((x + 1) · 127.5), clamped to 0..255)."""
    if isinstance(image, Image.Image):
        return np.asarray(to_grey_or_rgb(image, 3), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"image tensors must be float (3, H, W) in [-1, 1], got {image.dtype} of shape "
                             f"{tuple(image.shape)}")
        return np.asarray(to_pil(image.detach()))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image arrays must be uint8 (H, W, 3), got {image.dtype} of shape {image.shape}")
        return image
    raise TypeError(f"unsupported image type {type(image).__name__}: give a PIL image, a uint8 array (H, W, 3) "
                    "or a float tensor (3, H, W) in [-1, 1]")


def cell_slices(resolution: int, position: str) -> tuple[slice, slice]:
    """(rows, columns) of a position's cell, rounded as `mmgen.data.shapes.region_mean_color` rounds them."""
    col, row = _CELLS[position]
    edge = [round(k * resolution / 3) for k in range(4)]
    return slice(edge[row], edge[row + 1]), slice(edge[col], edge[col + 1])


def features(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the SVM's features: brightness masks, max channel / 255, float32 (N, H·W)."""
    return (pixels.max(axis=-1).reshape(len(pixels), -1) / np.float32(255)).astype(np.float32)


def _real_shapes(resolution: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n single-object renders as uint8 (n, R, R, 3) and their shapes' indices in SHAPES (n,)."""
    ds = ShapesDataset(size=n, resolution=resolution, max_objects=1, seed=seed)
    pixels = np.stack([to_pixels(ds[i][0]) for i in range(n)])
    return pixels, np.array([SHAPES.index(ds.objects(i)[0].shape) for i in range(n)])


class ShapeJudge:
    """The objects of shapes images at one resolution, read cell by cell (see the module docstring).

    Args:
        resolution: side of the images judged (>= 8); others raise ValueError.
    """

    def __init__(self, resolution: int):
        from sklearn.svm import SVC

        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        self.resolution = resolution
        self.min_bright = min_bright(resolution)
        x, y = _real_shapes(resolution, TRAIN_IMAGES, TRAIN_SEED)
        self.svm = SVC(C=10.0, gamma="scale").fit(features(x), y)

    @functools.cached_property
    def holdout_accuracy(self) -> float:
        """Shape accuracy of the SVM on 600 real single-object renders of another seed (101)."""
        x, y = _real_shapes(self.resolution, HOLDOUT_IMAGES, HOLDOUT_SEED)
        return float((self.svm.predict(features(x)) == y).mean())

    def pixels(self, image: ImageLike) -> np.ndarray:
        """`to_pixels`, checked to be at the judge's resolution."""
        out = to_pixels(image)
        if out.shape[:2] != (self.resolution, self.resolution):
            raise ValueError(f"this judge reads {self.resolution}×{self.resolution} images, got "
                             f"{out.shape[1]}×{out.shape[0]}; make a ShapeJudge({out.shape[0]})")
        return out

    def _predict(self, pixels: np.ndarray) -> list[str]:
        """uint8 (N, R, R, 3) -> N shape names."""
        return [SHAPES[int(k)] for k in self.svm.predict(features(pixels))]

    def shape(self, images: Sequence[ImageLike] | torch.Tensor) -> list[str]:
        """The shape of each whole single-object image; a list of images or a float tensor (N, 3, R, R)."""
        pixels = np.stack([self.pixels(im) for im in images])  # (N, R, R, 3)
        return self._predict(pixels)

    def objects(self, image: ImageLike) -> list[ShapeObject]:
        """The objects of one image, one per cell with at least `min_bright` bright pixels, in POSITIONS order."""
        pixels = self.pixels(image)  # (R, R, 3)
        bright = pixels.max(axis=-1) > BRIGHT_THRESHOLD  # (R, R)
        found: list[tuple[str, str]] = []  # (position, color)
        alone = []  # (R, R, 3) each: the image black outside that cell
        for position in POSITIONS:
            rows, cols = cell_slices(self.resolution, position)
            if int(bright[rows, cols].sum()) < self.min_bright:
                continue
            found.append((position, classify_color(pixels[rows, cols])))
            masked = np.zeros_like(pixels)
            masked[rows, cols] = pixels[rows, cols]
            alone.append(masked)
        if not found:
            return []
        shapes = self._predict(np.stack(alone))
        return [ShapeObject(color, shape, position) for (position, color), shape in zip(found, shapes, strict=True)]


__all__ = ["MIN_BRIGHT_FRACTION", "ImageLike", "ShapeJudge", "cell_slices", "features", "min_bright", "to_pixels"]
