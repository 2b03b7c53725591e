"""scikit-learn's handwritten digits (1,797 real 8×8 images, UCI) with templated captions.

Pixels 0..16 become floats in [-1, 1], one channel. A fixed, seeded split keeps held-out digits
for evaluation. Captions name the digit as a numeral or a word, in several phrasings.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch.utils.data import Dataset

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# caption -> image prompts, and image -> caption answers
PROMPT_TEMPLATES = (
    "a handwritten digit {d}",
    "the number {w}",
    "draw the digit {d}",
    "an image of a handwritten {w}",
    "digit {d}",
)
CAPTION_TEMPLATES = (
    "a handwritten digit {d}",
    "this is the number {w}",
    "the digit {d}",
    "a handwritten {w}",
)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (N, 8, 8) float32 in [-1, 1] and labels (N,)."""
    from sklearn.datasets import load_digits  # the data ships inside scikit-learn: no download

    d = load_digits()
    return (d.images.astype(np.float32) / 8.0 - 1.0), d.target.astype(np.int64)


def split_indices(n: int, held_out: int = 297, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed permutation split: (train indices, held-out indices)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def caption_for(label: int, template: str) -> str:
    """`template` with {d} the digit as a numeral and {w} as a word."""
    return template.format(d=label, w=WORDS[label])


def parse_digit(text: str) -> int | None:
    """The digit a caption names (numeral or word), or None if it names none or several."""
    found = {int(c) for c in re.findall(r"\d", text)}
    found |= {i for i, w in enumerate(WORDS) if re.search(rf"\b{w}\b", text.lower())}
    return found.pop() if len(found) == 1 else None


class DigitsDataset(Dataset):
    """(image (1, 8, 8) in [-1, 1], caption) pairs; the caption template varies with the index.

    Args:
        split: "train" (1,500 digits), "test" (297 held-out digits) or "all".
        templates: caption templates with {d} (numeral) and {w} (word) fields.
    """

    def __init__(self, split: str = "train", templates: tuple[str, ...] = PROMPT_TEMPLATES + CAPTION_TEMPLATES):
        images, labels = load_digits_arrays()
        train, test = split_indices(len(labels))
        pick = {"train": train, "test": test, "all": np.arange(len(labels))}
        if split not in pick:
            raise ValueError(f"split must be one of {sorted(pick)}, got {split!r}")
        self.images = torch.from_numpy(images[pick[split]])[:, None]  # (N, 1, 8, 8)
        self.labels = torch.from_numpy(labels[pick[split]])
        self.templates = templates

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        label = int(self.labels[i])
        return self.images[i], caption_for(label, self.templates[(i * 7 + label) % len(self.templates)])
