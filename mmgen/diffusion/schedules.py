"""Sampling schedules: the decreasing σs a sampler walks, always ending in 0.

uniform: uniform in the objective's own time t (DDIM / flow-matching default), optionally with a
flow shift t' = s·t / (1 + (s − 1)·t) (SD3; `resolution_shift` picks s from the token count).
karras: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7 (EDM).
A user-given list is validated and used as is.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from mmgen.diffusion.objective import MAX_SIGMA, Objective

VP_SIGMA_MAX = 80.0  # first σ of the uniform schedule for ε- and v-models (EDM's σ_max)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def uniform(objective: Objective, steps: int, shift: float = 1.0) -> Tensor:
    """`steps` σs uniform in t from the objective's sampling start down, then 0.

    Flow models start at t = 1 (σ capped at MAX_SIGMA: x0 = x_t − t·v is well conditioned there).
    ε- and v-models start at σ = VP_SIGMA_MAX: at σ = 999 their x0 = (x_t − s·ε̂)/a would multiply
    the error of ε̂ by 1/a ≈ 1000."""
    t_max = 1.0 if objective.kind == "flow" else float(objective.t_from_sigma(torch.tensor(VP_SIGMA_MAX, dtype=torch.float64)))
    t = torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)[:-1]
    t = shift * t / (1 + (shift - 1) * t)
    return _append_zero(objective.sigma(t).clamp(max=MAX_SIGMA))


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def resolution_shift(tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flow shift exp(μ), μ linear in the number of image tokens (SD3 / Flux's dynamic shifting)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + slope * (tokens - base_tokens))


def given(sigmas: Sequence[float]) -> Tensor:
    s = torch.as_tensor(list(sigmas), dtype=torch.float64)
    if s.ndim != 1 or len(s) < 2 or (s[:-1] <= s[1:]).any() or s[-1] < 0:
        raise ValueError("a sigma list must hold at least two strictly decreasing values >= 0")
    return s if s[-1] == 0 else _append_zero(s)


def make_sigmas(objective: Objective, steps: int, schedule: str | Sequence[float] = "uniform",
                shift: float = 1.0, sigma_min: float = 2e-3, sigma_max: float = 80.0) -> Tensor:
    """The σs for one sampling run.

    Args:
        objective: the model's objective (defines t -> σ for "uniform").
        steps: number of denoiser evaluations for first-order samplers.
        schedule: "uniform", "karras", or an explicit decreasing list of σs.
        shift: flow shift for "uniform" (1 = none).
        sigma_min, sigma_max: range for "karras" (EDM's 0.002 and 80 by default).
    """
    if not isinstance(schedule, str):
        return given(schedule)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "uniform":
        return uniform(objective, steps, shift)
    if schedule == "karras":
        return karras(steps, sigma_min, sigma_max)
    raise ValueError(f"unknown schedule {schedule!r}; choose 'uniform', 'karras' or give a list of sigmas")
