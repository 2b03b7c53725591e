"""Self-verification: how well a text describes each of several images, by the model's own likelihood.

The score of image x for text y is log p(y <eos> | x), teacher-forced in the image → caption form the
model learns from image-first samples (`mmgen.data.sources.caption_sample`):
    <bos> <boi> x <eoi> y_1 … y_n <eos>
summed over the n text tokens and <eos> (and divided by n + 1 for the mean per token), each image with its own text or all with one. <eos> counts:
the model learned that a caption ends there, so the score is the likelihood of exactly this caption,
not of every caption that starts with it. Images enter clean, read as a prompt image is
(`MMGenModel.read_images`: the understanding input if any, else the interface's `embed` at t = 0),
so every image interface scores the same way; one batched forward, no generation.

Shapes: N images, T tokens, C/H/W image, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmgen.errors import InputError
from mmgen.model import MMGenModel
from mmgen.sequence import IGNORE, SequenceBuilder


@dataclass
class Scores:
    """The scores of N images, each for its text.

    total:     (N,) log p(text <eos> | image), summed over the scored tokens (higher is better).
    per_token: (N,) total / tokens.
    tokens:    (N,) the number of scored tokens (the text's tokens and <eos>).
    """

    total: Tensor
    per_token: Tensor
    tokens: Tensor


@torch.no_grad()
def score_images(model: MMGenModel, builder: SequenceBuilder, images: Tensor, texts: str | Sequence[str]) -> Scores:
    """The model's log-likelihood of each text given its image, in the image → caption form (see the module).

    Args:
        model: the unified model (any image interface); used in eval mode as it is.
        builder: the sequence builder of the model's text tokenizer (`Pipeline.builder`).
        images: (N, C, H, W) in [-1, 1], at the model's image format.
        texts: the caption to score, one for all images or one per image.

    Raises:
        InputError: no images, an image tensor of the wrong rank, or a number of texts other than N.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"score_images takes images (N, C, H, W) with N >= 1, got {shape}; stack single images "
                         "with torch.stack([...])")
    texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
    if len(texts) != len(images):
        raise InputError(f"{len(texts)} texts for {len(images)} images: give one text, or one per image")
    batch = builder([[image, text] for image, text in zip(images.float(), texts)], add_eos=True).to(model.device)
    tokens = model.read_images(batch.images)  # (N, L, D), clean
    hidden, _ = model(model.embed(batch.ids, batch.image_id, tokens), batch.positions, batch.doc_id, batch.image_id)
    after_image = (batch.image_id >= 0).long().cumsum(1) > 0  # (N, T) from the first slot on
    scored = (batch.labels != IGNORE) & after_image  # (N, T) <eoi> → y_1, …, y_n → <eos>
    logp = model.logits(hidden[scored]).float().log_softmax(-1)  # (M, V), M scored tokens in all rows
    picked = logp.gather(1, batch.labels[scored][:, None])[:, 0]  # (M,)
    row = scored.nonzero()[:, 0]  # (M,) the row of each scored token
    total = picked.new_zeros(len(images)).index_add_(0, row, picked)  # (N,)
    count = scored.sum(1)  # (N,) n + 1 per row
    return Scores(total=total.cpu(), per_token=(total / count).cpu(), tokens=count.cpu())
