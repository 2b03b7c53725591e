"""Interfaces whose image tokens are predicted one after another (discrete, hybrid, mar).

They share the drawing loop: the hidden state at <boi> predicts token 0, each drawn token is fed
back through the cache and its hidden state predicts the next, L tokens in raster order. For
guidance the null prompt `<bos> <boi>` runs beside every row in the same batch and is fed the same
tokens. Subclasses say how one token is sampled from the conditioning hidden states (`sample_step`),
how a drawn token is embedded (`embed_step`), and how the steps form the image (`assemble`).
They take 1-D positions and uniform training times only (`check_model`).
Images they read may enter through a separate understanding input (`understanding`, built from
`image.understanding_input`); drawing itself always feeds back the interface's own tokens.

Shapes: R rows, D hidden, L tokens per image.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from mmgen.config import ModelConfig
from mmgen.errors import ConfigError
from mmgen.events import ImageStep
from mmgen.interfaces.base import Drawing, DrawRequest, ImageInterface
from mmgen.interfaces.understanding import build_understanding
from mmgen.tokenizers.image import ImageTokens


class CausalInterface(ImageInterface):
    causal = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        check_model(self.name, config)
        self.understanding = build_understanding(config)

    @abstractmethod
    def sample_step(self, cond: Tensor, uncond: Tensor | None, request: DrawRequest) -> ImageTokens:
        """One token per row from the hidden states that predict it (R, D) (and the null prompt's, when
        guided): ImageTokens with codes (R,) and/or latents (R, P)."""

    @abstractmethod
    def embed_step(self, step: ImageTokens) -> Tensor:
        """A drawn token per row -> its embedding (R, 1, D), fed back to the backbone."""

    @abstractmethod
    def assemble(self, steps: list[ImageTokens]) -> ImageTokens:
        """The L drawn tokens -> the image's tokens (codes (R, g, g) and/or latents (R, c, G, G))."""

    @torch.no_grad()
    def draw(self, request: DrawRequest) -> Drawing:
        r, length, model = request.rows, self.cfg.tokens_per_image, request.model
        guided = request.options.guidance.scale != 1
        kv, h = request.with_null_rows() if guided else (request.cache, request.last)  # (R or 2R rows)
        kv.reserve(kv.length + length)  # room for the whole image up front: the steps keep static shapes
        everyone = torch.ones(len(h), dtype=torch.bool, device=h.device)
        steps = []
        for k in range(length):
            step = self.sample_step(h[:r], h[r:] if guided else None, request)
            steps.append(step)
            if k < length - 1:
                x = self.embed_step(step)  # (R, 1, D)
                h = model.extend(kv, torch.cat([x, x]) if guided else x, everyone, True)[:, -1]
            yield ImageStep(list(range(r)), k + 1, length)
        return self.assemble(steps)


def check_model(name: str, config: ModelConfig) -> None:
    """Raise a ConfigError, naming the fix, for a model option the causal interfaces do not take (yet)."""
    if config.backbone.image_positions != "1d":
        raise ConfigError(f"backbone.image_positions = {config.backbone.image_positions!r} is not supported by the "
                          f"{name!r} interface yet (it draws image tokens one at a time); use '1d', or the "
                          "'diffusion' interface")
    if config.image.patch_encoder != "linear":
        raise ConfigError(f"image.patch_encoder = {config.image.patch_encoder!r} applies to the 'diffusion' interface "
                          f"(its patches are denoised in the backbone); the {name!r} interface embeds each token "
                          "alone: set it to 'linear'")
    if config.diffusion.t_sampling != "uniform":
        raise ConfigError(f"diffusion.t_sampling = {config.diffusion.t_sampling!r} applies to the 'diffusion' "
                          f"interface; the {name!r} interface draws no such time in the backbone (the MLP head of "
                          "hybrid / mar draws its own uniform t): drop it")
