"""Continuous tokens predicted one after another (MAR's per-token head on a causal backbone).

Each token is a p×p latent patch (P values). The backbone embeds clean tokens with a linear
layer; the hidden state at slot i − 1 (`<boi>` for the first) conditions the MLP diffusion head
that models token i. Drawing runs the head once per token, then feeds the token back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmgen.config import ImageConfig, ModelConfig
from mmgen.diffusion.guidance import Guidance
from mmgen.heads.mlp import MLPHead
from mmgen.interfaces.base import DrawRequest, require_tokenizer
from mmgen.interfaces.causal import CausalInterface
from mmgen.interfaces.understanding import check_understanding
from mmgen.tokenizers.image import ImageTokens


@dataclass
class HeadOptions:
    """Tokens drawn by the MLP head: `image_steps` steps of `sampler` (None: the head's own `steps`),
    guidance against the null prompt's hidden state, starting noise scaled by `image_temperature`."""

    guidance: Guidance = field(default_factory=Guidance)
    image_temperature: float = 1.0
    image_steps: int | None = None
    sampler: str = "euler"


class MARInterface(CausalInterface):
    name = "mar"
    Options = HeadOptions

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.proj_in = nn.Linear(self.cfg.patch_dim, self.hidden_size)
        self.head = MLPHead(self.cfg.patch_dim, self.hidden_size, self.cfg.head)

    @classmethod
    def check_config(cls, image: ImageConfig) -> None:
        require_tokenizer(cls.name, image, discrete=False)
        check_understanding(cls.name, cls.causal, image)

    def init_weights(self) -> None:
        self.head.reset_parameters()  # the MLP head keeps its own (adaLN-Zero) initialization

    def embed(self, tokens: ImageTokens) -> Tensor:
        return self.proj_in(self.patchify(tokens.latents.to(self.proj_in.weight.dtype)))  # (N, L, D)

    def train_inputs(self, tokens: ImageTokens, conditions: Tensor, generator=None):
        return self.embed(tokens), self.patchify(tokens.latents)

    def loss(self, patches: Tensor, slots: Tensor, prev: Tensor, generator=None) -> Tensor:
        n, l, d = prev.shape
        per_token = self.head.loss(patches.reshape(n * l, -1), prev.reshape(n * l, d), generator)  # (N·L,)
        return self.cfg.head.loss_weight * per_token.view(n, l).mean(1)

    def sample_step(self, cond: Tensor, uncond: Tensor | None, request: DrawRequest) -> ImageTokens:
        o = request.options
        patch = self.head.sample(cond, o.image_steps or self.cfg.head.steps, o.guidance, o.image_temperature,
                                 uncond, request.generators, o.sampler)  # (R, P)
        return ImageTokens(latents=patch)

    def embed_step(self, step: ImageTokens) -> Tensor:
        return self.proj_in(step.latents.to(self.proj_in.weight.dtype))[:, None]  # (R, 1, D)

    def assemble(self, steps: list[ImageTokens]) -> ImageTokens:
        return ImageTokens(latents=self.unpatchify(torch.stack([s.latents for s in steps], 1)))
