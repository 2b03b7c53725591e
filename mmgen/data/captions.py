"""Image-caption pairs -> interleaved training samples, in both directions.

caption -> image (text first; the caption is dropped with probability `caption_dropout` so
classifier-free guidance has a null condition) and image -> caption (image first: its noise is
capped during training, see DiffusionConfig).
"""

from __future__ import annotations

import random
from typing import Sequence

from torch.utils.data import Dataset

from mmgen.sequence import Sample


class CaptionSamples(Dataset):
    """Wraps a dataset of (image, caption) into samples. Item i's direction and dropout are a pure
    function of (seed, epoch, i): reproducible in any order, and different each epoch.

    Args:
        pairs: dataset whose items are (image tensor, caption string).
        p_image_first: share of image -> caption samples (Transfusion: 0.2).
        caption_dropout: share of caption -> image samples whose caption is replaced by "".
        seed: seed of the direction / dropout draws.
    """

    def __init__(self, pairs: Dataset, p_image_first: float = 0.2, caption_dropout: float = 0.1, seed: int = 0):
        for name, p in (("p_image_first", p_image_first), ("caption_dropout", caption_dropout)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.pairs, self.p_image_first, self.caption_dropout = pairs, p_image_first, caption_dropout
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Sample:
        image, caption = self.pairs[i]
        rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
        if rng.random() < self.p_image_first:
            return [image, caption]
        if rng.random() < self.caption_dropout:
            caption = ""
        return [caption, image]


def corpus(pairs: Dataset, limit: int | None = None) -> Sequence[str]:
    """All captions of a pair dataset, for training the text tokenizer."""
    n = len(pairs) if limit is None else min(limit, len(pairs))
    return [pairs[i][1] for i in range(n)]
