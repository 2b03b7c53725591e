"""In-backbone continuous image head (Transfusion): p×p patches in, patch predictions out.

Images (N, C, H, W) -> patches (N, L, P) with L = (H/p)·(W/p), P = C·p·p, in raster order.
`embed` projects patches to the hidden width and adds a timestep embedding per patch;
`predict` maps the backbone's hidden states at image slots back to patch space.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from mmgen.config import ImageConfig


def timestep_features(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of t ∈ [0, 1] (scaled by 1000, as in DDPM), (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchHead(nn.Module):
    def __init__(self, cfg: ImageConfig, hidden_size: int, time_features: int = 256):
        super().__init__()
        self.cfg = cfg
        self.time_features = time_features
        self.proj_in = nn.Linear(cfg.patch_dim, hidden_size)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_features, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.proj_out = nn.Linear(hidden_size, cfg.patch_dim)

    def patchify(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, P)."""
        p = self.cfg.patch_size
        return rearrange(images, "n c (h p) (w q) -> n (h w) (c p q)", p=p, q=p)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(N, L, P) -> (N, C, H, W)."""
        p, g = self.cfg.patch_size, self.cfg.grid
        return rearrange(patches, "n (h w) (c p q) -> n c (h p) (w q)", h=g, w=g, p=p, q=p)

    def embed(self, patches: Tensor, t: Tensor) -> Tensor:
        """Patches (N, L, P) at noise time t (N,) -> token embeddings (N, L, D)."""
        time = self.time_mlp(timestep_features(t, self.time_features).to(patches.dtype))  # (N, D)
        return self.proj_in(patches) + time[:, None, :]

    def predict(self, hidden: Tensor) -> Tensor:
        """Hidden states at image slots (N, L, D) -> patch predictions (N, L, P)."""
        return self.proj_out(hidden)
