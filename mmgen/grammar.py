"""Which token may come next when image codes share the decode loop with text (Chameleon).

The joint vocabulary is text ids [0, V) followed by image codes [V, V + K). Per row the state is
-1 outside an image, or k ∈ [0, L]: the number of codes emitted since `<boi>`. The rule:
    outside an image: any text id except `<eoi>`; no code
    after <boi>, k < L: a code, nothing else
    k = L:              `<eoi>`, nothing else
So after `<boi>` come exactly L = h·w codes, then `<eoi>`; codes never appear outside images and
text never inside. `constrain` applies the rule to logits, `advance` moves the state (and raises
on an illegal token, so a bug in a caller cannot go unnoticed).
"""

from __future__ import annotations

import torch
from torch import Tensor

OUTSIDE = -1


class ImageGrammar:
    def __init__(self, text_vocab: int, codebook_size: int, tokens_per_image: int, boi_id: int, eoi_id: int):
        if not (0 <= boi_id < text_vocab and 0 <= eoi_id < text_vocab):
            raise ValueError(f"<boi>={boi_id} and <eoi>={eoi_id} must be text ids below {text_vocab}")
        self.text_vocab, self.codebook_size, self.length = text_vocab, codebook_size, tokens_per_image
        self.boi_id, self.eoi_id = boi_id, eoi_id

    @property
    def size(self) -> int:
        return self.text_vocab + self.codebook_size

    def allowed(self, state: Tensor) -> Tensor:
        """(B,) states -> (B, V + K) bool, True where the token is legal."""
        ids = torch.arange(self.size, device=state.device)[None]  # (1, V + K)
        is_code = ids >= self.text_vocab
        s = state[:, None]  # (B, 1)
        outside = (s == OUTSIDE) & ~is_code & (ids != self.eoi_id)
        drawing = (s >= 0) & (s < self.length) & is_code
        closing = (s == self.length) & (ids == self.eoi_id)
        return outside | drawing | closing

    def constrain(self, logits: Tensor, state: Tensor) -> Tensor:
        """Logits (B, V + K) with every illegal token at -inf."""
        return logits.masked_fill(~self.allowed(state), float("-inf"))

    def advance(self, state: Tensor, tokens: Tensor) -> Tensor:
        """The state after emitting `tokens` (B,); raises ValueError on an illegal token."""
        legal = self.allowed(state).gather(1, tokens[:, None])[:, 0]
        if not legal.all():
            row = int((~legal).nonzero()[0])
            raise ValueError(f"illegal token {int(tokens[row])} in state {int(state[row])} (row {row})")
        inside = state >= 0
        return torch.where(
            inside & (state < self.length), state + 1,
            torch.where(inside, OUTSIDE, torch.where(tokens == self.boi_id, 0, OUTSIDE)),
        )
