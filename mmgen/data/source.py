"""The data-source contract: items 0..n-1 that become interleaved samples, and the two data errors.

A source is indexed once when built (`mmgen.data.sources.build_source`); `sample(i, rng)` loads item
i and raises `UnreadableItem` when it cannot, so the pipeline skips and counts it; `DataError` means
the source cannot be used at all. Implementations: `mmgen.data.sources`, `mmgen.data.dialogues`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from mmgen.sequence import Sample


class UnreadableItem(Exception):
    """One item cannot be loaded; the pipeline skips it and counts it."""


class Source:
    """Items 0..n-1. Subclasses set `name` and `n`, and implement `sample` and `texts`."""

    name: str = "source"
    n: int = 0
    dropped: int = 0  # items dropped while indexing (missing files, malformed lines)
    loss_on: str = "all"  # "assistant": conversations get LM labels on assistant turns only

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int, rng: random.Random) -> Sample:
        """Item i as a sample (texts and images in order), varied by `rng`; raises `UnreadableItem`."""
        raise NotImplementedError

    def texts(self) -> Iterator[str]:
        """The text of every item, without decoding images (for training a text tokenizer)."""
        raise NotImplementedError
