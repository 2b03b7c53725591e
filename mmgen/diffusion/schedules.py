"""Sampling schedules: the decreasing σs a sampler walks, always ending in 0.

uniform: uniform in the objective's own time t (DDIM / flow-matching default), optionally with a
flow shift t' = s·t / (1 + (s − 1)·t) (SD3; `resolution_shift` picks s from the token count).
karras: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7 (EDM).
A user-given list (`check_schedule`) is used as is, with a 0 appended if it does not end in one.
A run takes at most MAX_STEPS steps: more would cost minutes per image and gain nothing.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from mmgen.diffusion.objective import MAX_SIGMA, Objective
from mmgen.errors import OptionError, check_number

VP_SIGMA_MAX = 80.0  # first σ of the uniform schedule for ε- and v-models (EDM's σ_max)
MAX_STEPS = 1000  # the most denoising steps of one run (and of the MLP head per token)
SCHEDULES = ("uniform", "karras")


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


def check_schedule(schedule: object, name: str = "schedule") -> str | tuple[float, ...]:
    """A schedule name, or a user's σ list as a tuple of floats; raises OptionError unless it is one of
    SCHEDULES or a list or tuple of finite σs in [0, MAX_SIGMA], strictly decreasing from a positive
    first one, with at most MAX_STEPS steps (a final 0 is added if missing)."""
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return schedule
    rule = (f"must be {' or '.join(map(repr, SCHEDULES))}, or a list of strictly decreasing finite sigmas in "
            f"[0, {MAX_SIGMA:g}], at most {MAX_STEPS} steps (a final 0 is added if missing), e.g. [14.6, 3.0, 0.7, 0]")
    if not isinstance(schedule, (list, tuple)) or not 1 <= len(schedule) <= MAX_STEPS + 1:
        unknown = "unknown schedule; " if isinstance(schedule, str) else ""
        raise OptionError(f"{name} = {schedule!r:.80}: {unknown}{rule}")
    for i, s in enumerate(schedule):
        check_number(f"{name}[{i}]", s, low=0, high=MAX_SIGMA)
    out = tuple(float(s) for s in schedule)
    if out[0] == 0 or any(a <= b for a, b in zip(out, out[1:])):
        raise OptionError(f"{name} = {schedule!r:.80}: not strictly decreasing from a positive sigma; {rule}")
    if len(out) - (out[-1] == 0) > MAX_STEPS:
        raise OptionError(f"{name} = a list of {len(out) - (out[-1] == 0)} steps: {rule}")
    return out


def given(sigmas: Sequence[float]) -> Tensor:
    """A user's σ list (see `check_schedule`) -> the σs to walk, ending in 0."""
    s = torch.tensor(check_schedule(list(sigmas)), dtype=torch.float64)
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
    schedule = check_schedule(schedule)
    if not isinstance(schedule, str):
        return given(schedule)
    check_number("steps", steps, low=1, high=MAX_STEPS, integer=True)
    return uniform(objective, steps, shift) if schedule == "uniform" else karras(steps, sigma_min, sigma_max)
