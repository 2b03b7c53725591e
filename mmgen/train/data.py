"""The training data stream: a seeded mixture of sources, cut into per-process micro-batches by step.

Sample j of epoch e is a pure function of (seed, e, j): which source (drawn by weight) and which
item (a per-epoch permutation of that source) — so any step's batch can be rebuilt from the step
number alone, which is what makes resuming exact and process counts interchangeable. Step s uses
positions [b·G, (b+1)·G) of epoch e = s // steps_per_epoch (b = s mod steps_per_epoch, G = global
batch); process r takes the r-th slice of G/P samples and cuts it into `accum` micro-batches.
Unreadable items are skipped (the next item of the same source takes their place) and counted.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmgen.chat_template import Message, assistant_targets, render
from mmgen.data.source import Source, UnreadableItem
from mmgen.errors import DataError
from mmgen.sequence import SequenceBuilder
from mmgen.train.packing import Item, Packer


class Mixture:
    """Maps (epoch, position) -> (source, item) for sources of `lengths` mixed by `weights`.

    Args:
        lengths: items per source.
        weights: relative sampling weights (normalized here).
        seed: seed of every draw.
        epoch_size: positions per epoch (0: the sum of `lengths`).
    """

    def __init__(self, lengths: Sequence[int], weights: Sequence[float], seed: int, epoch_size: int = 0):
        if not lengths or min(lengths) < 1:
            raise DataError(f"every source needs at least one item, got sizes {list(lengths)}")
        self.lengths, self.seed = list(lengths), seed
        self.p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.epoch_size = epoch_size or sum(lengths)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def table(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, item) arrays of one epoch, each (epoch_size,)."""
        if epoch not in self._cache:
            n, k = self.epoch_size, len(self.lengths)
            rng = np.random.default_rng([self.seed, epoch, 0])
            source = rng.choice(k, size=n, p=self.p) if k > 1 else np.zeros(n, dtype=np.int64)
            item = np.empty(n, dtype=np.int64)
            for s, size in enumerate(self.lengths):
                where = np.flatnonzero(source == s)
                ordinal = np.arange(len(where))  # the m-th draw from source s this epoch
                for cycle in range(int(np.ceil(len(where) / size))):
                    perm = np.random.default_rng([self.seed, epoch, s + 1, cycle]).permutation(size)
                    part = slice(cycle * size, (cycle + 1) * size)
                    item[where[part]] = perm[ordinal[part] - cycle * size]
            self._cache = {epoch: (source, item)}  # one epoch at a time: batches never straddle epochs
        return self._cache[epoch]

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        source, item = self.table(epoch)
        return int(source[position]), int(item[position])


class TrainDataset(Dataset):
    """Dataset keyed by (epoch, position): the tokenized sample at that place of the mixture.

    Args:
        sources: the indexed sources.
        mixture: their mixture.
        builder: tokenizes samples (its `max_length` bounds every sample).
        seed: seed of per-item draws (caption direction, caption dropout).
        max_skips: unreadable items in a row tolerated before raising `DataError`.
        verbose: print the first few skip warnings.
    """

    def __init__(self, sources: list[Source], mixture: Mixture, builder: SequenceBuilder, seed: int,
                 max_skips: int = 100, verbose: bool = True):
        self.sources, self.mixture, self.builder, self.seed = sources, mixture, builder, seed
        self.max_skips, self.verbose, self.warned = max_skips, verbose, 0

    def __len__(self) -> int:
        return self.mixture.epoch_size

    def __getitem__(self, key: tuple[int, int]) -> Item:
        epoch, position = key
        s, i = self.mixture.locate(epoch, position)
        source, skipped = self.sources[s], 0
        while True:
            j = (i + skipped) % len(source)
            rng = random.Random(f"{self.seed}/{s}/{epoch}/{j}")  # string seeds hash the same in every process
            try:
                item = self.tokenize(source.sample(j, rng), source.loss_on == "assistant")
                item.source, item.skipped = s, skipped
                return item
            except UnreadableItem as e:
                skipped += 1
                if self.verbose and self.warned < 5:
                    self.warned += 1
                    print(f"warning: skipping an unreadable item of {source.name}: {e}"
                          f"{' (further skips are only counted)' if self.warned == 5 else ''}", file=sys.stderr)
                if skipped > self.max_skips:
                    raise DataError(f"{skipped} unreadable items in a row in {source.name} (last: {e}); fix the data "
                                    "or raise data.max_skips") from None

    def tokenize(self, sample, assistant_only: bool = False) -> Item:
        """Sample (or conversation) -> Item; a text-only sample over the maximum length is cut, any other
        failure is unreadable. `assistant_only`: a conversation's LM targets are its assistant turns."""
        if sample and isinstance(sample[0], Message):  # a conversation: the chat template renders it
            sample = render(sample, self.builder.tok, lambda image: image, generation_prompt=False)
        item = self._item(sample)
        if assistant_only:
            item.targets = assistant_targets(item.ids, self.builder.tok)
        return item

    def _item(self, sample) -> Item:
        try:
            return Item(*self.builder.tokens(sample))
        except ValueError as e:
            if any(not isinstance(seg, (str, list)) for seg in sample):
                raise UnreadableItem(str(e)) from None
            ids = [t for seg in sample for t in (self.builder.tok.encode(seg) if isinstance(seg, str) else seg)]
            if len(ids) <= self.builder.max_length - 2:
                raise UnreadableItem(str(e)) from None  # not a length problem (an empty sample)
            return Item(*self.builder.tokens([ids[: self.builder.max_length - 2]]), truncated=True)


class StepBatches:
    """Batch sampler: for steps [start, end), this process's `accum` micro-batches of dataset keys."""

    def __init__(self, epoch_size: int, global_batch: int, rank: int, world: int, accum: int, start: int, end: int):
        if global_batch % (world * accum):
            raise DataError(f"train.batch_size={global_batch} is not divisible by processes × grad_accum = "
                            f"{world} × {accum}; pick a multiple of {world * accum}")
        self.steps_per_epoch = epoch_size // global_batch
        if self.steps_per_epoch < 1:
            raise DataError(f"an epoch has {epoch_size} samples, fewer than one global batch of {global_batch}; "
                            "lower train.batch_size or raise data.epoch_size")
        self.g, self.rank, self.accum, self.start, self.end = global_batch, rank, accum, start, end
        self.per_rank = global_batch // world
        self.micro = self.per_rank // accum

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def __len__(self) -> int:
        return (self.end - self.start) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            epoch, b = divmod(step, self.steps_per_epoch)
            base = b * self.g + self.rank * self.per_rank
            for m in range(self.accum):
                yield [(epoch, base + m * self.micro + q) for q in range(self.micro)]


def make_loader(dataset: TrainDataset, batches: StepBatches, packer: Packer, num_workers: int = 0) -> DataLoader:
    # its own generator: creating an iterator must not draw from the global RNG (resumed runs create one more)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=packer, num_workers=num_workers,
                      prefetch_factor=2 if num_workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))


def corpus(sources: list[Source], limit: int) -> list[str]:
    """Up to `limit` non-empty texts, drawn evenly from the sources, for training a text tokenizer."""
    per = max(1, limit // len(sources))
    out = []
    for src in sources:
        out += [t for t, _ in zip((t for t in src.texts() if t and t.strip()), range(per))]
    if not out:
        raise DataError("the data sources hold no text to train a text tokenizer on; give tokenizer.path")
    return out
