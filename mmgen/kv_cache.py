"""The KV cache of generation: preallocated per-layer buffers written in place at the current length.

Every layer's keys and values live in a (B, K, C, E) buffer of capacity C. A chunk of T tokens is
written at slots [length, length + T) (`Attention` does it with `index_copy_`), and attention reads
the first S slots of the buffer: the filled prefix plus the chunk (S = length + T), or the whole
capacity with the empty tail masked (S = C, the static shape a captured step uses, `mmgen.capture`).
Capacity is reserved up front (`reserve`, sized from the request) and grows geometrically, so no
step concatenates. Per slot the cache keeps the metadata the attention rule needs: doc (−1 empty)
and image id (−1 text); every row shares the slot index, a row that is idle during a chunk gets
empty slots there.

`select`, `drop_empty` and `pad_and_stack` return new caches with their own storage: writing one never
changes another. Shapes: B rows, K key/value heads, C capacity, E head dim, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

GRANULE = 64  # capacities are multiples of this: fewer distinct static shapes (and captured steps)


def round_capacity(n: int) -> int:
    """The capacity that holds n slots: n rounded up to a multiple of GRANULE (at least one granule)."""
    return max(GRANULE, -(-n // GRANULE) * GRANULE)


@dataclass
class KVCache:
    """Keys/values of every layer plus the per-slot metadata of the attention rule.

    keys[l], values[l]: (B, K, C, E) buffers; slots [0, length) are filled, the rest are empty.
    slot_doc: (B, C) document of each slot, −1 for an empty one; slot_image: (B, C) image id, −1 text.
    next_position: (B,) RoPE position of each row's next token (its sequence component under 2-D positions).
    images: image ids in use are below this; the next image written takes it (no device read needed).
    steps: captured steps over these buffers (`mmgen.capture`), dropped when the buffers change.
    """

    keys: list[Tensor]
    values: list[Tensor]
    slot_doc: Tensor
    slot_image: Tensor
    next_position: Tensor
    length: int = 0
    images: int = 0
    steps: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def empty(cls, like: Tensor, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int) -> KVCache:
        """A cache of `rows` rows with no filled slot; buffers on `like`'s device and of its dtype."""
        c = round_capacity(capacity)
        shape = (rows, kv_heads, c, head_dim)
        meta = torch.full((rows, c), -1, dtype=torch.long, device=like.device)
        return cls([like.new_zeros(shape) for _ in range(layers)], [like.new_zeros(shape) for _ in range(layers)],
                   meta, meta.clone(), torch.zeros(rows, dtype=torch.long, device=like.device))

    @classmethod
    def filled(cls, kv: list[tuple[Tensor, Tensor]], doc_id: Tensor, image_id: Tensor, next_position: Tensor,
               images: int, room: int = 0) -> KVCache:
        """A cache holding prefilled keys/values (B, K, S, E) per layer with their metadata (B, S), with
        capacity for `room` more slots."""
        b, k, s, e = kv[0][0].shape
        cache = cls.empty(kv[0][0], len(kv), b, k, e, s + room)
        for layer, (key, value) in enumerate(kv):
            cache.keys[layer][:, :, :s] = key
            cache.values[layer][:, :, :s] = value
        cache.slot_doc[:, :s], cache.slot_image[:, :s] = doc_id, image_id
        cache.next_position, cache.length, cache.images = next_position, s, images
        return cache

    @property
    def capacity(self) -> int:
        return self.slot_doc.shape[1]

    @property
    def doc_id(self) -> Tensor:
        """(B, length) document of each filled slot (−1: empty)."""
        return self.slot_doc[:, : self.length]

    @property
    def image_id(self) -> Tensor:
        """(B, length) image id of each filled slot (−1: text)."""
        return self.slot_image[:, : self.length]

    def reserve(self, slots: int) -> None:
        """Make room for `slots` filled slots in all: grow the buffers (at least doubling) if they are smaller."""
        if slots <= self.capacity:
            return
        grown = KVCache.empty(self.keys[0], len(self.keys), *self.keys[0].shape[:2], self.keys[0].shape[3],
                              max(slots, 2 * self.capacity))
        self._copy_into(grown, slice(None))
        self.keys, self.values = grown.keys, grown.values
        self.slot_doc, self.slot_image = grown.slot_doc, grown.slot_image
        self.steps.clear()  # captured steps point at the old buffers

    def slots(self, t: int) -> Tensor:
        """(T,) the slots a chunk of t tokens takes: [length, length + t)."""
        return torch.arange(self.length, self.length + t, device=self.slot_doc.device)

    def commit(self, doc_id: Tensor, image_id: Tensor, advance: Tensor, image: bool) -> None:
        """Mark the chunk whose keys/values were just written at `slots(T)` as filled: its metadata (B, T),
        each row's position advance (B,), and whether it was an image (which then takes id `images`)."""
        t = doc_id.shape[1]
        self.slot_doc[:, self.length : self.length + t] = doc_id
        self.slot_image[:, self.length : self.length + t] = image_id
        self.length += t
        self.next_position = self.next_position + advance
        self.images += int(image)

    def select(self, rows: Tensor) -> KVCache:
        """A new cache holding only the given batch rows (B',); this cache is left as it is."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.slot_doc[rows],
                       self.slot_image[rows], self.next_position[rows], self.length, self.images)

    def drop_empty(self) -> KVCache:
        """This cache without the filled slots that are empty in every row (left behind by rows that left the
        batch), moved to the front; attention depends on slot order and metadata only, so the rows' outputs
        do not change. Returns this cache itself when there is nothing to drop."""
        used = (self.doc_id >= 0).any(0)  # (length,)
        if bool(used.all()):
            return self
        keep = used.nonzero().flatten()  # (S',)
        out = KVCache.empty(self.keys[0], len(self.keys), *self.keys[0].shape[:2], self.keys[0].shape[3],
                            self.capacity)
        n = len(keep)
        for src, dst in zip(self.keys + self.values, out.keys + out.values):
            dst[:, :, :n] = src[:, :, keep]
        out.slot_doc[:, :n], out.slot_image[:, :n] = self.slot_doc[:, keep], self.slot_image[:, keep]
        out.next_position, out.length, out.images = self.next_position, n, self.images
        return out

    def _copy_into(self, other: KVCache, rows: slice) -> None:
        """Copy this cache's filled slots into `other`'s given rows (its capacity must hold them)."""
        s = self.length
        for src, dst in zip(self.keys + self.values, other.keys + other.values):
            dst[rows, :, :s] = src[:, :, :s]
        other.slot_doc[rows, :s], other.slot_image[rows, :s] = self.doc_id, self.image_id


def pad_and_stack(caches: list[KVCache]) -> KVCache:
    """Concatenate caches along the batch (new storage); shorter ones are right-padded with empty slots."""
    first = caches[0]
    rows = [c.slot_doc.shape[0] for c in caches]
    out = KVCache.empty(first.keys[0], len(first.keys), sum(rows), first.keys[0].shape[1], first.keys[0].shape[3],
                        max(c.capacity for c in caches))
    start = 0
    for c, n in zip(caches, rows):
        c._copy_into(out, slice(start, start + n))
        start += n
    out.next_position = torch.cat([c.next_position for c in caches])
    out.length, out.images = max(c.length for c in caches), max(c.images for c in caches)
    return out
