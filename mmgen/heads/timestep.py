"""Sinusoidal timestep features shared by the in-backbone patch embedding and the MLP head."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_features(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of t ∈ [0, 1] (scaled by 1000, as in DDPM), (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
