"""Interleaved samples -> one token sequence per sample, and the attention rule over it.

A sample is a list of segments, each a string, a list of token ids (text already tokenized),
or an image tensor (C, H, W) in [-1, 1]:
    <bos> text … <boi> img_0 … img_{L-1} <eoi> text … <eos>
Special ids are inserted as integers, never parsed from text. Query q may attend key k iff
both belong to the same document and (k <= q, or both lie in the same image); padding is
never attended, and every query sees itself (a fully masked SDPA row would be NaN). That rule is one
predicate (`may_attend`), used as a dense boolean mask and as a FlexAttention mask_mod.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import torch
from torch import Tensor

Segment = Union[str, list[int], Tensor]
Sample = Sequence[Segment]
IGNORE = -100  # label of positions that carry no LM loss


class SpecialIds(Protocol):
    """What the builder needs from a text tokenizer."""

    bos_id: int
    eos_id: int
    pad_id: int
    boi_id: int
    eoi_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class SequenceBatch:
    """A padded batch. Images are numbered 0..N-1 in reading order (row by row, left to right).

    ids:        (B, T) token ids; image slots hold <pad>.
    image_id:   (B, T) index of the image a slot belongs to, -1 for text and padding.
    doc_id:     (B, T) 0 for real tokens, -1 for padding (room for packing several documents a row).
    positions:  (B, T) sequence positions (from 0 in every document); the model maps them to RoPE
                positions (`mmgen.positions`: the same under "1d", M-RoPE triples under "2d").
    labels:     (B, T) next-token target per position, IGNORE where there is no LM loss.
    images:     (N, C, H, W) the images, in [-1, 1].
    image_conditions: (N,) True where an image comes before its text (image -> caption): its
                noise is capped during training.
    """

    ids: Tensor
    image_id: Tensor
    doc_id: Tensor
    positions: Tensor
    labels: Tensor
    images: Tensor
    image_conditions: Tensor

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def check_image(image: Tensor, channels: int, resolution: int) -> None:
    """Raise a ValueError naming the problem if `image` is not a valid (C, H, W) image in [-1, 1]."""
    if not isinstance(image, Tensor):
        raise TypeError(f"an image segment must be a torch.Tensor (C, H, W), got {type(image).__name__}")
    if not image.is_floating_point():
        raise ValueError(f"image dtype must be floating point in [-1, 1], got {image.dtype}; use x / 127.5 - 1")
    if image.shape != (channels, resolution, resolution):
        raise ValueError(
            f"image shape {tuple(image.shape)} does not match the model: expected "
            f"({channels}, {resolution}, {resolution}) (channels, height, width)"
        )
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or inf pixels")
    lo, hi = image.min().item(), image.max().item()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"image pixels must lie in [-1, 1], got range [{lo:.3g}, {hi:.3g}]")


class SequenceBuilder:
    """Turns interleaved samples into a `SequenceBatch`.

    Args:
        tokenizer: text tokenizer with the special ids (see `SpecialIds`).
        channels, resolution: the image shape the model takes.
        tokens_per_image: slots between <boi> and <eoi>.
        max_length: longest allowed sequence, in tokens.
    """

    def __init__(self, tokenizer: SpecialIds, channels: int, resolution: int, tokens_per_image: int, max_length: int):
        self.tok = tokenizer
        self.channels, self.resolution = channels, resolution
        self.tokens_per_image, self.max_length = tokens_per_image, max_length
        # an image is a condition (its noise capped in training) when words follow it and none precede it
        # since the start or the last role marker: a caption's image, or an image a user turn opens with
        self.role_ids = frozenset(getattr(tokenizer, n) for n in ("user_id", "assistant_id") if hasattr(tokenizer, n))
        self.special_ids = frozenset(getattr(tokenizer, "special_ids", (tokenizer.bos_id, tokenizer.eos_id)))

    def _ids(self, seg: str | list[int]) -> list[int]:
        return self.tok.encode(seg) if isinstance(seg, str) else seg

    def tokens(self, sample: Sample, add_eos: bool = True) -> tuple[list[int], list[int], list[Tensor], list[bool]]:
        """One sample -> ids, per-slot image index (-1 text), its images, and which precede their text."""
        def is_text(seg: Segment) -> bool:
            return isinstance(seg, (str, list))

        if len(sample) == 0 or all(is_text(s) and not s for s in sample):
            raise ValueError("empty sample: give at least one non-empty text segment or one image")
        encoded = [list(self._ids(seg)) if is_text(seg) else None for seg in sample]
        has_words = [seg is not None and any(t not in self.special_ids for t in seg) for seg in encoded]
        ids, img, images, conditions = [self.tok.bos_id], [-1], [], []
        words_before = False  # words since the start or the last role marker
        for i, (seg, text) in enumerate(zip(sample, encoded)):
            if text is not None:
                for t in text:
                    if t in self.role_ids:
                        words_before = False
                    elif t not in self.special_ids:
                        words_before = True
                ids += text
                img += [-1] * len(text)
                continue
            check_image(seg, self.channels, self.resolution)
            conditions.append(any(has_words[i + 1 :]) and not words_before)
            ids += [self.tok.boi_id] + [self.tok.pad_id] * self.tokens_per_image + [self.tok.eoi_id]
            img += [-1] + [len(images)] * self.tokens_per_image + [-1]
            images.append(seg)
        if add_eos:
            ids.append(self.tok.eos_id)
            img.append(-1)
        if len(ids) > self.max_length:
            raise ValueError(
                f"sample is {len(ids)} tokens long, over the model's maximum of {self.max_length}; "
                "shorten the text or use fewer images"
            )
        return ids, img, images, conditions

    def __call__(self, samples: Sequence[Sample], add_eos: bool = True) -> SequenceBatch:
        if len(samples) == 0:
            raise ValueError("empty batch: give at least one sample")
        rows = [self.tokens(s, add_eos) for s in samples]
        b, t = len(rows), max(len(r[0]) for r in rows)
        ids = torch.full((b, t), self.tok.pad_id, dtype=torch.long)
        image_id = torch.full((b, t), -1, dtype=torch.long)
        doc_id = torch.full((b, t), -1, dtype=torch.long)
        images, conditions = [], []
        for r, (row_ids, row_img, row_images, row_cond) in enumerate(rows):
            n = len(row_ids)
            ids[r, :n] = torch.tensor(row_ids)
            offset = len(images)
            image_id[r, :n] = torch.tensor([i + offset if i >= 0 else -1 for i in row_img])
            doc_id[r, :n] = 0
            images += row_images
            conditions += row_cond
        positions = ((doc_id >= 0).long().cumsum(1) - 1).clamp(min=0)  # 1-D RoPE over the sequence
        labels = next_token_labels(ids, image_id, doc_id)
        c, h = self.channels, self.resolution
        return SequenceBatch(
            ids=ids,
            image_id=image_id,
            doc_id=doc_id,
            positions=positions,
            labels=labels,
            images=torch.stack(images).float() if images else torch.zeros(0, c, h, h),
            image_conditions=torch.tensor(conditions, dtype=torch.bool),
        )


def next_token_labels(ids: Tensor, image_id: Tensor, doc_id: Tensor) -> Tensor:
    """Label position t with ids[t+1], except inside images, onto image slots, and across documents."""
    labels = torch.full_like(ids, IGNORE)
    target_ok = (image_id[:, 1:] < 0) & (doc_id[:, 1:] >= 0) & (doc_id[:, 1:] == doc_id[:, :-1])
    source_ok = image_id[:, :-1] < 0
    labels[:, :-1] = torch.where(target_ok & source_ok, ids[:, 1:], IGNORE)
    return labels


def may_attend(q_doc: Tensor, q_image: Tensor, q_slot: Tensor, k_doc: Tensor, k_image: Tensor, k_slot: Tensor
               ) -> Tensor:
    """The attention rule, elementwise over broadcastable tensors: True where the query (document, image,
    slot) may attend the key. Same document and (k <= q or the same image); never padding (document -1);
    every query sees itself. The dense mask and the FlexAttention mask_mod both call this one predicate."""
    same_doc = (q_doc == k_doc) & (k_doc >= 0)
    same_image = (q_image == k_image) & (k_image >= 0)
    return (same_doc & ((k_slot <= q_slot) | same_image)) | (k_slot == q_slot)


def attention_mask(
    q_doc: Tensor, q_image: Tensor, k_doc: Tensor, k_image: Tensor, offset: int = 0
) -> Tensor:
    """The attention rule for queries at key slots [offset, offset + T) over keys [0, S).

    Args:
        q_doc, q_image: (B, T) document and image index of each query (-1: padding / text).
        k_doc, k_image: (B, S) the same for every key, including the queries themselves.
        offset: key slot of the first query (the cache length when decoding).

    Returns:
        (B, 1, T, S) boolean mask, True = attend.
    """
    t, s = q_doc.shape[1], k_doc.shape[1]
    q_slot = torch.arange(offset, offset + t, device=q_doc.device)[:, None]  # (T, 1)
    k_slot = torch.arange(s, device=q_doc.device)[None, :]  # (1, S)
    allowed = may_attend(q_doc[:, :, None], q_image[:, :, None], q_slot,
                         k_doc[:, None, :], k_image[:, None, :], k_slot)  # (B, T, S)
    return allowed[:, None]


def mask_mod(doc_id: Tensor, image_id: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The attention rule over one uncached chunk (B, T) as a FlexAttention `mask_mod(b, h, q, k)`: queries
    and keys are the same slots, so `attention_mask(doc_id, image_id, doc_id, image_id)[b, 0, q, k]`
    equals `mask_mod(...)(b, h, q, k)` for every head h."""

    def rule(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return may_attend(doc_id[b, q], image_id[b, q], q, doc_id[b, k], image_id[b, k], k)

    return rule
