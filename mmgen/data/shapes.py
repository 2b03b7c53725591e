"""Procedural, download-free "shapes" dataset with compositional captions.

Each image shows 1..N colored circles/squares/triangles on a black background,
each placed in a distinct named region of a 3x3 grid (left/right/top/bottom/
center), rendered anti-aliased at any resolution, with an English caption.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 90, 255),
    "yellow": (245, 230, 40),
    "purple": (155, 45, 215),
    "orange": (255, 130, 0),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")

# (column, row) of each region's cell in the 3x3 grid.
_CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
            "bottom": "at the bottom", "center": "in the center"}
OBJECT_SIZE = 0.28  # object extent as a fraction of the image side
SUPERSAMPLE = 4
BRIGHT_THRESHOLD = 96  # max-channel value (0..255) above which a pixel is "object"


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        for name, value, vocab in (("color", self.color, tuple(COLORS)),
                                   ("shape", self.shape, SHAPES),
                                   ("position", self.position, POSITIONS)):
            if value not in vocab:
                raise ValueError(f"unknown {name} {value!r}; expected one of {vocab}")


def _coverage(shape: str, cx: float, cy: float, size: float, resolution: int) -> np.ndarray:
    """Fractional pixel coverage (resolution, resolution) of one shape via supersampling."""
    n = resolution * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n  # sample centers in [0, 1]
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    half = size / 2
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upward triangle: apex at top-center, base along the bottom edge
        depth = dy + half  # distance below the apex (image y grows downward)
        inside = (depth >= 0) & (depth <= size) & (np.abs(dx) <= depth / 2)
    inside = inside.astype(np.float32)
    return inside.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))


def render(objects: Sequence[ShapeObject], resolution: int,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Render objects on a black background as a (resolution, resolution, 3) uint8 array.

    Args:
        objects: Objects to draw; their positions must be distinct.
        resolution: Output side length in pixels (>= 8).
        rng: If given, jitters each object's size (+-10%) and its center within
            its cell (the object always stays inside its cell); if None, objects
            are drawn at nominal size, centered in their cells.
    """
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions):
        raise ValueError(f"objects must occupy distinct positions, got {positions}")
    image = np.zeros((resolution, resolution, 3), dtype=np.float32)
    for obj in objects:
        col, row = _CELLS[obj.position]
        cx, cy, size = (col + 0.5) / 3, (row + 0.5) / 3, OBJECT_SIZE
        if rng is not None:
            size *= rng.uniform(0.9, 1.1)
            slack = max(1 / 6 - size / 2, 0.0)
            cx += rng.uniform(-slack, slack)
            cy += rng.uniform(-slack, slack)
        alpha = _coverage(obj.shape, cx, cy, size, resolution)[..., None]
        color = np.asarray(COLORS[obj.color], dtype=np.float32)
        image = image * (1 - alpha) + color * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _describe(obj: ShapeObject) -> str:
    article = "an" if obj.color[0] in "aeiou" else "a"
    return f"{article} {obj.color} {obj.shape} {_PHRASES[obj.position]}"


def caption(objects: Sequence[ShapeObject]) -> str:
    """Compositional English caption, e.g. "a red circle on the left and a blue square at the top".

    Args:
        objects: One or more objects, described in the given order.
    """
    if not objects:
        raise ValueError("caption needs at least one object")
    parts = [_describe(o) for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def sample_objects(rng: np.random.Generator, max_objects: int = 3) -> list[ShapeObject]:
    """Sample 1..max_objects objects with distinct positions and random color/shape.

    Args:
        rng: Source of randomness.
        max_objects: Upper bound on the (uniformly drawn) object count, in 1..5.
    """
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
    count = int(rng.integers(1, max_objects + 1))
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    colors = tuple(COLORS)
    return [ShapeObject(colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))],
                        POSITIONS[p]) for p in positions]


def classify_color(pixels: np.ndarray) -> str:
    """Named color nearest in hue to the mean of the bright pixels (all pixels if none are).

    Colors are compared after dividing by their max channel, so dim or anti-aliased
    pixels (e.g. a darkened orange) still map to the right name.

    Args:
        pixels: (N, 3) or (..., 3) RGB values on a 0..255 scale (uint8 or float).
    """
    flat = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
    if flat.shape[0] == 0:
        raise ValueError("classify_color needs at least one pixel")
    bright = flat[flat.max(axis=1) > BRIGHT_THRESHOLD]
    mean = (bright if len(bright) else flat).mean(axis=0)
    palette = np.asarray(list(COLORS.values()), dtype=np.float64)
    palette /= palette.max(axis=1, keepdims=True)
    dists = np.linalg.norm(palette - mean / max(mean.max(), 1e-6), axis=1)
    return tuple(COLORS)[int(np.argmin(dists))]


def region_mean_color(image: np.ndarray, position: str) -> np.ndarray:
    """Mean RGB (float64, shape (3,)) of bright pixels in a named region; zeros if none.

    Args:
        image: (H, W, 3) RGB image on a 0..255 scale.
        position: One of POSITIONS; selects the matching cell of the 3x3 grid.
    """
    if position not in _CELLS:
        raise ValueError(f"unknown position {position!r}; expected one of {POSITIONS}")
    image = np.asarray(image, dtype=np.float64)
    h, w = image.shape[:2]
    col, row = _CELLS[position]
    cell = image[round(row * h / 3):round((row + 1) * h / 3),
                 round(col * w / 3):round((col + 1) * w / 3)].reshape(-1, 3)
    bright = cell[cell.max(axis=1) > BRIGHT_THRESHOLD]
    return bright.mean(axis=0) if len(bright) else np.zeros(3)


class ShapesDataset(Dataset):
    """Deterministic synthetic dataset of (image in [-1, 1] as (3, H, W), caption) pairs."""

    def __init__(self, size: int = 10_000, resolution: int = 32, max_objects: int = 3,
                 seed: int = 0) -> None:
        """Args:
            size: Number of items (>= 1).
            resolution: Image side length in pixels (>= 8).
            max_objects: Maximum objects per image, in 1..5.
            seed: Non-negative base seed; item i uses np.random.default_rng([seed, i]).
        """
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if not 1 <= max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.size, self.resolution = size, resolution
        self.max_objects, self.seed = max_objects, seed

    def __len__(self) -> int:
        return self.size

    def _rng(self, i: int) -> np.random.Generator:
        i = operator.index(i)
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for dataset of size {self.size}")
        return np.random.default_rng([self.seed, i % self.size])

    def objects(self, i: int) -> list[ShapeObject]:
        """Objects of item i (same as used by __getitem__)."""
        return sample_objects(self._rng(i), self.max_objects)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        rng = self._rng(i)
        objs = sample_objects(rng, self.max_objects)
        image = render(objs, self.resolution, rng)
        tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return tensor.contiguous(), caption(objs)
