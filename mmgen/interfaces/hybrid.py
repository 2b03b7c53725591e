"""HART: discrete codes as next tokens, plus each token's continuous residual from an MLP head.

The backbone sees and predicts codes exactly as in the discrete interface. The residual of token
i (latent − dequantize(code), as the hybrid tokenizer defines it) is modelled by a per-token MLP
diffusion head conditioned on [hidden state that predicted code i ; embedding of code i]; it is
not fed back to the backbone, so drawing a residual never changes what the backbone sees.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmgen.config import ModelConfig
from mmgen.heads.mlp import MLPHead
from mmgen.interfaces.discrete import DiscreteInterface
from mmgen.tokenizers.image import ImageTokens


class HybridInterface(DiscreteInterface):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.head = MLPHead(self.cfg.patch_dim, 2 * self.hidden_size, self.cfg.head)

    def condition(self, prev: Tensor, codes: Tensor) -> Tensor:
        """(..., D) hidden states and (...) codes -> (..., 2D) head conditions."""
        return torch.cat([prev, self.code_embed(codes)], -1)

    def loss(self, tokens: ImageTokens, slots: Tensor, prev: Tensor, generator=None) -> Tensor:
        ce = super().loss(tokens, slots, prev)  # (N,)
        n, l, d = prev.shape
        cond = self.condition(prev, self.flatten_codes(tokens.codes)).reshape(n * l, 2 * d)  # (N·L, 2D)
        residual = self.patchify(tokens.latents.to(prev.dtype)).reshape(n * l, -1)  # (N·L, c)
        head = self.head.loss(residual, cond, generator).view(n, l).mean(1)  # (N,)
        return ce + self.cfg.head.loss_weight * head

    def sample_token(self, prev, prev_uncond, codes: Tensor, opts, generators) -> ImageTokens:
        residual = self.head.sample(
            self.condition(prev, codes), opts.image_steps or self.cfg.head.steps, opts.guidance,
            opts.image_temperature, None if prev_uncond is None else self.condition(prev_uncond, codes),
            generators, opts.sampler,
        )  # (R, c)
        return ImageTokens(codes=codes, latents=residual)

    def assemble(self, steps: list[ImageTokens]) -> ImageTokens:
        residual = torch.stack([s.latents for s in steps], 1)  # (R, L, c)
        return ImageTokens(codes=super().assemble(steps).codes, latents=self.unpatchify(residual))
