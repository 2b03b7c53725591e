"""Chameleon: VQ codes predicted as next tokens, in raster order, with causal attention.

Codes have their own embedding and output head (K rows each) beside the text vocabulary, so a
pretrained LLM keeps its vocabulary untouched; at decode time text and code logits are joined
into one vocabulary [text | codes] and `mmgen.grammar.ImageGrammar` decides what may come next.
The code at slot i is predicted from the hidden state at slot i − 1 (`<boi>` for the first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.config import ModelConfig
from mmgen.interfaces.base import ImageInterface
from mmgen.tokenizers.image import ImageTokens


class DiscreteInterface(ImageInterface):
    causal = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        k, d = self.cfg.tokenizer.codebook_size, self.hidden_size
        self.max_corruption = config.diffusion.max_t_when_conditioning
        self.code_embed = nn.Embedding(k, d)
        self.code_head = nn.Linear(d, k, bias=False)

    def code_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., K)."""
        return self.code_head(hidden)

    def embed(self, tokens: ImageTokens) -> Tensor:
        return self.code_embed(self.flatten_codes(tokens.codes))  # (N, L, D)

    def train_inputs(self, tokens: ImageTokens, conditions: Tensor, generator=None):
        """Clean code embeddings, except for images that precede their text: there a random share
        (up to `max_t_when_conditioning`) of the input codes is replaced by random codes, the
        discrete counterpart of the capped noise on conditioning images. Without it a small dataset's
        code sequences are memorized: on the digits, captions of held-out images fell to 31%
        against 99% on the training images. Targets stay the true codes."""
        codes = self.flatten_codes(tokens.codes)  # (N, L)
        n, l = codes.shape
        if self.training and conditions.any():
            rate = torch.rand(n, generator=generator, device=codes.device) * self.max_corruption
            rate = torch.where(conditions.to(codes.device), rate, 0.0)  # (N,)
            swap = torch.rand(n, l, generator=generator, device=codes.device) < rate[:, None]
            noise = torch.randint(0, self.cfg.tokenizer.codebook_size, (n, l), generator=generator, device=codes.device)
            codes = torch.where(swap, noise, codes)
        return self.code_embed(codes), tokens

    def loss(self, tokens: ImageTokens, slots: Tensor, prev: Tensor, generator=None) -> Tensor:
        logits = self.code_logits(prev).float()  # (N, L, K)
        ce = F.cross_entropy(logits.flatten(0, 1), self.flatten_codes(tokens.codes).flatten(), reduction="none")
        return ce.view(len(logits), -1).mean(1)  # (N,)

    # -- drawing, one token at a time ----------------------------------------------------------

    def sample_token(self, prev, prev_uncond, codes: Tensor, opts, generators) -> ImageTokens:
        return ImageTokens(codes=codes)

    def embed_token(self, step: ImageTokens) -> Tensor:
        return self.code_embed(step.codes)[:, None]  # (R, 1, D)

    def assemble(self, steps: list[ImageTokens]) -> ImageTokens:
        return ImageTokens(codes=self.unflatten_codes(torch.stack([s.codes for s in steps], 1)))
