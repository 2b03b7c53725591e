"""HART: discrete codes as next tokens, plus each token's continuous residual from an MLP head.

The backbone sees and predicts codes exactly as in the discrete interface. The residual of token
i (latent − dequantize(code), as the hybrid tokenizer defines it) is modelled by a per-token MLP
diffusion head conditioned on [hidden state that predicted code i ; embedding of code i]; it is
not fed back to the backbone, so drawing a residual never changes what the backbone sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmgen.config import ImageConfig, ModelConfig
from mmgen.heads.mlp import MLPHead
from mmgen.interfaces.base import DrawRequest, require_tokenizer
from mmgen.interfaces.discrete import CodeOptions, DiscreteInterface
from mmgen.sampling import GenerationOptions
from mmgen.tokenizers.image import ImageTokens


@dataclass
class HybridOptions(CodeOptions):
    """Codes as in `CodeOptions`; residuals by the MLP head in `image_steps` steps of `sampler`
    (None: the head's own `steps`), its starting noise scaled by `image_temperature`."""

    image_steps: int | None = None
    sampler: str = "euler"


class HybridInterface(DiscreteInterface):
    name = "hybrid"
    Options = HybridOptions

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.head = MLPHead(self.cfg.patch_dim, 2 * self.hidden_size, self.cfg.head)

    @classmethod
    def check_config(cls, image: ImageConfig) -> None:
        super().check_config(image)
        require_tokenizer(cls.name, image, discrete=True, kind="hybrid")

    def options(self, options: GenerationOptions) -> HybridOptions:
        """Any `Guidance` (its scale guides the code logits; all of it guides the residual head)."""
        return options.image_options(self.Options, self.name)

    def init_weights(self) -> None:
        self.head.reset_parameters()  # the MLP head keeps its own (adaLN-Zero) initialization

    def condition(self, prev: Tensor, codes: Tensor) -> Tensor:
        """(..., D) hidden states and (...) codes -> (..., 2D) head conditions."""
        return torch.cat([prev, self.code_embed(codes)], -1)

    def loss(self, tokens: ImageTokens, slots: Tensor, prev: Tensor, generator=None) -> Tensor:
        ce = super().loss(tokens, slots, prev)  # (N,)
        n, l, d = prev.shape
        cond = self.condition(prev, tokens.codes.flatten(1)).reshape(n * l, 2 * d)  # (N·L, 2D)
        residual = self.patchify(tokens.latents.to(prev.dtype)).reshape(n * l, -1)  # (N·L, c)
        head = self.head.loss(residual, cond, generator).view(n, l).mean(1)  # (N,)
        return ce + self.cfg.head.loss_weight * head

    def sample_step(self, cond: Tensor, uncond: Tensor | None, request: DrawRequest) -> ImageTokens:
        o = request.options
        codes = self.sample_codes(cond, uncond, request)  # (R,)
        residual = self.head.sample(
            self.condition(cond, codes), o.image_steps or self.cfg.head.steps, o.guidance, o.image_temperature,
            None if uncond is None else self.condition(uncond, codes), request.generators, o.sampler,
        )  # (R, c)
        return ImageTokens(codes=codes, latents=residual)

    def assemble(self, steps: list[ImageTokens]) -> ImageTokens:
        residual = torch.stack([s.latents for s in steps], 1)  # (R, L, c)
        return ImageTokens(codes=super().assemble(steps).codes, latents=self.unpatchify(residual))
