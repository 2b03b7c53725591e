"""Noise schedules and prediction targets, and the bridge to one denoiser form D(x, σ).

Training uses the model's native time t ∈ [0, 1]: x_t = a(t)·x0 + s(t)·ε.
  "eps":  cosine VP schedule (Improved DDPM, s = 0.008), the model predicts ε.
  "flow": x_t = (1 − t)·x0 + t·ε (flow matching), the model predicts v = ε − x0.
Samplers see the equivalent VE form x = x_t / a(t), σ = s(t) / a(t), and a denoiser D(x, σ) ≈ x0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

COSINE_S = 0.008
MAX_SIGMA = 999.0  # largest σ used: t ≈ 0.999 for flow, ᾱ ≈ 1e-6 for the cosine schedule


class Objective:
    """One training objective: schedule, target, and the conversions to x0 and to σ."""

    def __init__(self, kind: str):
        if kind not in ("eps", "flow"):
            raise ValueError(f"objective must be 'eps' or 'flow', got {kind!r}")
        self.kind = kind

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """a(t), s(t) with x_t = a·x0 + s·ε."""
        if self.kind == "flow":
            return 1 - t, t
        phi = (t + COSINE_S) / (1 + COSINE_S) * (math.pi / 2)
        phi0 = COSINE_S / (1 + COSINE_S) * (math.pi / 2)
        alpha_bar = (torch.cos(phi) / math.cos(phi0)).pow(2).clamp(1 / (1 + MAX_SIGMA**2), 1.0)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Noisy input and training target. t is per image: (N,), broadcast over the other dims."""
        a, s = (v.view(-1, *[1] * (x0.dim() - 1)) for v in self.alpha_sigma(t))
        target = noise if self.kind == "eps" else noise - x0
        return a * x0 + s * noise, target

    def to_x0(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """Model prediction at time t -> predicted clean sample."""
        a, s = (v.view(-1, *[1] * (x_t.dim() - 1)) for v in self.alpha_sigma(t))
        if self.kind == "eps":
            return (x_t - s * pred) / a
        return x_t - s * pred  # flow: x_t = x0 + t·v, and s = t

    def sigma(self, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return s / a

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        if self.kind == "flow":
            return sigma / (1 + sigma)
        alpha_bar = 1 / (1 + sigma**2)
        phi0 = COSINE_S / (1 + COSINE_S) * (math.pi / 2)
        phi = torch.arccos((alpha_bar.sqrt() * math.cos(phi0)).clamp(-1, 1))
        return (phi / (math.pi / 2) * (1 + COSINE_S) - COSINE_S).clamp(0, 1)

    def sigmas(self, steps: int, t_max: float = 1.0) -> Tensor:
        """Sampling σs: `steps` points uniform in t from t_max (σ capped at MAX_SIGMA) down, then 0."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        t = torch.linspace(t_max, 0, steps + 1, dtype=torch.float64)[:-1]
        sig = self.sigma(t).clamp(max=MAX_SIGMA)
        return torch.cat([sig, sig.new_zeros(1)])
