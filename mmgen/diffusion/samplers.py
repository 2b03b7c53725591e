"""Samplers over a denoiser D(x, σ) -> x0, k-diffusion style: pure functions, one signature.

Every sampler is `sample_x(denoiser, x, sigmas, callback=None) -> x`, where x starts as noise of
scale sigmas[0] and sigmas ends at 0. Euler on this VE-form ODE is exactly DDIM with η = 0.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None]


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, callback: Callback | None = None) -> Tensor:
    """First-order ODE steps dx/dσ = (x − D(x, σ)) / σ (= DDIM, η = 0).

    Args:
        denoiser: D(x, σ) with σ a scalar tensor.
        x: noise scaled by sigmas[0].
        sigmas: decreasing noise levels ending in 0, (steps + 1,).
        callback: called after every step with {"i", "steps", "sigma", "x", "denoised"}.
    """
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        x = denoised + (x - denoised) * (sigma_next / sigma)  # == x + (x − D)/σ · (σ_next − σ)
        if callback is not None:
            callback({"i": i, "steps": steps, "sigma": sigma, "x": x, "denoised": denoised})
    return x


SAMPLERS = {"euler": sample_euler, "ddim": sample_euler}
