"""Tokenized samples -> one padded `SequenceBatch`, packed or one sample per row; padding counted.

"pack": rows of at most `length` tokens, as few as first-fit decreasing needs, filled evenly; each
sample is its own document in its row (its own doc_id, positions from 0), so the attention rule
keeps samples apart and no label crosses a sample boundary. "pad": one sample per row, in order.
Rows are padded to the longest. Images are numbered in reading order (row by row, left to right),
as `SequenceBatch` requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmgen.sequence import IGNORE, SequenceBatch, next_token_labels


@dataclass
class Item:
    """One tokenized sample (the output of `SequenceBuilder.tokens`) and what happened on the way."""

    ids: list[int]
    image_slots: list[int]  # per token: index into `images`, -1 for text
    images: list[Tensor]  # (C, H, W) each
    conditions: list[bool]  # per image: it precedes its text
    source: int = 0
    skipped: int = 0  # unreadable items skipped to reach this one
    truncated: bool = False  # a text-only sample cut to the maximum length
    targets: list[bool] | None = None  # per token: may it be an LM target (None: every token may)


@dataclass
class PackedBatch:
    batch: SequenceBatch
    stats: dict[str, int] = field(default_factory=dict)  # samples, tokens, slots, labelled, images, skipped, truncated

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.batch.to(device), self.stats)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: as many rows as first-fit decreasing needs, then balanced (each sample,
    longest first, goes to the least-filled row it fits), so rows end near the same length and padding
    to the longest row stays small. A sample longer than `capacity` gets a row of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    free: list[int] = []
    for i in order:  # first-fit decreasing: how many rows are needed
        r = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if r is None:
            free.append(capacity)
            r = len(free) - 1
        free[r] -= lengths[i]
    rows: list[list[int]] = [[] for _ in free]
    load = [0] * len(free)
    for i in order:
        fits = [r for r in range(len(rows)) if load[r] + lengths[i] <= capacity] or [len(rows)]
        if fits[0] == len(rows):
            rows.append([])
            load.append(0)
        r = min(fits, key=lambda r: (load[r], r))
        rows[r].append(i)
        load[r] += lengths[i]
    return [row for row in rows if row]


class Packer:
    """Collate function: list[Item] -> PackedBatch.

    Args:
        pad_id: token id of padding.
        channels, resolution: image shape, for an empty image tensor when no sample has images.
        mode: "pack" or "pad".
        length: row capacity in tokens when packing.
    """

    def __init__(self, pad_id: int, channels: int, resolution: int, mode: str = "pack", length: int = 512):
        if mode not in ("pack", "pad"):
            raise ValueError(f"packing mode must be 'pack' or 'pad', got {mode!r}")
        self.pad_id, self.channels, self.resolution, self.mode, self.length = pad_id, channels, resolution, mode, length

    def __call__(self, items: list[Item]) -> PackedBatch:
        if not items:
            raise ValueError("empty micro-batch")
        lengths = [len(it.ids) for it in items]
        rows = pack_rows(lengths, self.length) if self.mode == "pack" else [[i] for i in range(len(items))]
        b, t = len(rows), max(sum(lengths[i] for i in row) for row in rows)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        image_id = torch.full((b, t), -1, dtype=torch.long)
        doc_id = torch.full((b, t), -1, dtype=torch.long)
        positions = torch.zeros((b, t), dtype=torch.long)
        targets = torch.ones((b, t), dtype=torch.bool)
        images, conditions = [], []
        for r, row in enumerate(rows):
            at = 0
            for doc, i in enumerate(row):
                it, n = items[i], lengths[i]
                ids[r, at : at + n] = torch.tensor(it.ids)
                image_id[r, at : at + n] = torch.tensor([s + len(images) if s >= 0 else -1 for s in it.image_slots])
                doc_id[r, at : at + n] = doc
                positions[r, at : at + n] = torch.arange(n)  # RoPE positions restart in every document
                if it.targets is not None:
                    targets[r, at : at + n] = torch.tensor(it.targets, dtype=torch.bool)
                images += it.images
                conditions += it.conditions
                at += n
        labels = next_token_labels(ids, image_id, doc_id)
        labels[:, :-1] = torch.where(targets[:, 1:], labels[:, :-1], IGNORE)  # position t predicts token t + 1
        c, h = self.channels, self.resolution
        batch = SequenceBatch(
            ids=ids, image_id=image_id, doc_id=doc_id, positions=positions, labels=labels,
            images=torch.stack(images).float() if images else torch.zeros(0, c, h, h),
            image_conditions=torch.tensor(conditions, dtype=torch.bool),
        )
        stats = {
            "samples": len(items),
            "tokens": sum(lengths),  # real tokens, image slots included
            "slots": b * t,  # tokens + padding
            "labelled": int((labels != IGNORE).sum()),
            "images": len(images),
            "skipped": sum(it.skipped for it in items),
            "truncated": sum(it.truncated for it in items),
        }
        return PackedBatch(batch, stats)
