"""Transfusion: continuous latents denoised inside the backbone, bidirectional within each image.

Latents (N, c, G, G) are cut into p×p patches (N, L, P); a linear layer maps each patch to the
hidden width and a timestep embedding is added per image; a zero-initialized linear layer maps
the hidden states at the slots back to patch space (ε, v or flow velocity, per `objective`).
Noise time is drawn per image and capped for an image that precedes its text (DESIGN §4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmgen.config import ModelConfig
from mmgen.diffusion.objective import Objective
from mmgen.heads.timestep import timestep_features
from mmgen.interfaces.base import ImageInterface
from mmgen.tokenizers.image import ImageTokens


class DiffusionInterface(ImageInterface):
    causal = False

    def __init__(self, config: ModelConfig, time_features: int = 256):
        super().__init__(config)
        self.diffusion = config.diffusion
        self.objective = Objective(config.diffusion.objective)
        self.time_features = time_features
        d, p = self.hidden_size, self.cfg.patch_dim
        self.proj_in = nn.Linear(p, d)
        self.time_mlp = nn.Sequential(nn.Linear(time_features, d), nn.SiLU(), nn.Linear(d, d))
        self.proj_out = nn.Linear(d, p)

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj_out.weight)  # start by predicting zeros (DiT-style)
        nn.init.zeros_(self.proj_out.bias)

    def embed_patches(self, patches: Tensor, t: Tensor) -> Tensor:
        """Patches (N, L, P) at noise time t (N,) -> token embeddings (N, L, D)."""
        time = self.time_mlp(timestep_features(t, self.time_features).to(patches.dtype))  # (N, D)
        return self.proj_in(patches) + time[:, None, :]

    def predict(self, hidden: Tensor) -> Tensor:
        """Hidden states at image slots (N, L, D) -> model output per patch (N, L, P)."""
        return self.proj_out(hidden)

    def embed(self, tokens: ImageTokens) -> Tensor:
        latents = tokens.latents
        return self.embed_patches(self.patchify(latents.to(self.proj_in.weight.dtype)), latents.new_zeros(len(latents)))

    def train_inputs(self, tokens: ImageTokens, conditions: Tensor, generator: torch.Generator | None):
        x0 = tokens.latents.to(self.proj_in.weight.dtype)
        n = len(x0)
        t = torch.rand(n, generator=generator, device=x0.device)
        t = torch.where(conditions, t * self.diffusion.max_t_when_conditioning, t)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t, target = self.objective.add_noise(x0, t, noise)
        return self.embed_patches(self.patchify(x_t), t), self.patchify(target)

    def loss(self, target: Tensor, slots: Tensor, prev: Tensor, generator=None) -> Tensor:
        err = (self.predict(slots).float() - target.float()).pow(2).mean((1, 2))  # (N,)
        return self.diffusion.loss_weight * err
