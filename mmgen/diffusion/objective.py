"""Noise schedules and prediction targets, and the bridge to one denoiser form D(x, σ).

Training uses the model's native time t ∈ [0, 1]: x_t = a(t)·x0 + s(t)·ε.
  "eps":  cosine VP schedule (Improved DDPM, s = 0.008), the model predicts ε.
  "v":    the same schedule, the model predicts v = a·ε − s·x0 (Salimans & Ho 2022).
  "flow": x_t = (1 − t)·x0 + t·ε (flow matching), the model predicts v = ε − x0.
Samplers see the equivalent VE form x = x_t / a(t), σ = s(t) / a(t), and a denoiser D(x, σ) ≈ x0.
t = 1 is pure noise. Training draws t per image by `draw_times`: uniform, or logit-normal (SD3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

COSINE_S = 0.008
MAX_SIGMA = 999.0
KINDS = ("eps", "v", "flow")  # largest σ used: t ≈ 0.999 for flow, ᾱ ≈ 1e-6 for the cosine schedule


def draw_times(n: int, generator: torch.Generator | None, device: torch.device, kind: str = "uniform",
               mean: float = 0.0, std: float = 1.0) -> Tensor:
    """n training times t (n,) in [0, 1], drawn through `generator` (same generator state, same t).

    Args:
        kind: "uniform": `torch.rand(n)` exactly; "logit_normal": sigmoid(mean + std·ν), ν = `torch.randn(n)`
            (Esser et al. 2024 §3.1; mean 0 puts the mass at t = 0.5, the middle of the schedule).
    """
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"t sampling must be 'uniform' or 'logit_normal', got {kind!r}")


class Objective:
    """One training objective: schedule, target, and the conversions to x0 and to σ."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"objective must be one of {KINDS}, got {kind!r}")
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
        targets = {"eps": lambda: noise, "v": lambda: a * noise - s * x0, "flow": lambda: noise - x0}
        return a * x0 + s * noise, targets[self.kind]()

    def to_x0(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """Model prediction at time t -> predicted clean sample."""
        a, s = (v.view(-1, *[1] * (x_t.dim() - 1)) for v in self.alpha_sigma(t))
        if self.kind == "eps":
            return (x_t - s * pred) / a
        if self.kind == "v":
            return a * x_t - s * pred
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
