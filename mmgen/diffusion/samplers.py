"""Samplers over a denoiser D(x, σ) -> x0, k-diffusion style: pure functions, one signature.

Every sampler is `sample_x(denoiser, x, sigmas, callback=None, noise=None, **options) -> x`: x
starts as noise of scale sigmas[0], sigmas decrease to 0, `callback` gets a dict after each
step, `noise(σ, σ_next)` supplies unit Gaussian noise to the stochastic ones (i.i.d. or a
Brownian tree, see `mmgen.diffusion.noise`). The VE form makes one implementation serve ε-,
v- and flow models (flow time t maps to σ = t / (1 − t), x = x_t / (1 − t)).

Each sampler is written once, as a generator that yields that dict after every step and returns x;
`sample_x.steps(denoiser, x, sigmas, noise=None, **options)` is that generator, for callers that
stream (`x = yield from SAMPLERS[name].steps(...)`), and `sample_x(...)` runs it to the end.
Branches on σ (the last step to 0, a step without noise) test a host copy of `sigmas` read once per
run, and the noise sampler gets host floats: a step reads no device value.
"""

from __future__ import annotations

import functools
from typing import Callable, Generator

import torch
from torch import Tensor

from mmgen.diffusion.noise import iid_noise

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]


Steps = Generator[dict, None, Tensor]


def _info(i: int, sigmas: Tensor, x: Tensor, denoised: Tensor) -> dict:
    return {"i": i, "steps": len(sigmas) - 1, "sigma": sigmas[i], "x": x, "denoised": denoised}


def stepwise(steps: Callable[..., Steps]) -> Callable[..., Tensor]:
    """The plain sampler `(denoiser, x, sigmas, callback=None, noise=None, **options) -> x` over a
    step generator; the generator stays reachable as `.steps`."""

    @functools.wraps(steps)
    def sample(denoiser: Denoiser, x: Tensor, sigmas: Tensor, callback: Callback | None = None,
               noise: NoiseSampler | None = None, **options) -> Tensor:
        run = steps(denoiser, x, sigmas, noise=noise, **options)
        while True:
            try:
                info = next(run)
            except StopIteration as done:
                return done.value
            if callback is not None:
                callback(info)

    sample.steps = steps
    return sample


@stepwise
@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None) -> Steps:
    """First-order ODE steps on dx/dσ = (x − D) / σ; identical to DDIM with η = 0."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = denoised + (x - denoised) * (sigmas[i + 1] / sigmas[i])
        yield _info(i, sigmas, x, denoised)
    return x


@stepwise
@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None) -> Steps:
    """Heun's second-order method (EDM, Algorithm 1 without churn); Euler on the last step to σ = 0.

    Use it with a schedule that has no huge first step (Karras): on the uniform-t schedule of a flow
    model (first σ = 999) the trapezoid amplifies the denoiser's error at the second point ~σ/2 times.
    """
    host = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        d = (x - denoised) / sigma
        x_next = x + d * (sigma_next - sigma)
        if host[i + 1] > 0:
            d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma)
        x = x_next
        yield _info(i, sigmas, x, denoised)
    return x


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float, last: bool) -> tuple[Tensor, Tensor]:
    """(σ_down, σ_up) for a stochastic step: σ_up = η·σ'·sqrt(1 − σ'²/σ²), σ_down² = σ'² − σ_up²;
    `last`: σ' = 0 (no noise then).

    In VE form this is exactly DDIM's σ_t(η) of Song et al. (2021), for any VP or flow schedule."""
    if eta == 0 or last:
        return sigma_next, sigma_next * 0
    up = torch.clamp(eta * sigma_next * (1 - sigma_next**2 / sigma**2).sqrt(), max=sigma_next)
    return (sigma_next**2 - up**2).sqrt(), up


@stepwise
@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None,
                eta: float = 0.0) -> Steps:
    """DDIM(η): deterministic at η = 0 (= Euler), DDPM-like ancestral sampling at η = 1."""
    noise = noise or iid_noise(x)
    host = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        last = host[i + 1] == 0
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta, last)
        x = denoised + (x - denoised) * (down / sigmas[i])
        if eta > 0 and not last:  # σ_up > 0
            x = x + noise(host[i], host[i + 1]) * up
        yield _info(i, sigmas, x, denoised)
    return x


@stepwise
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None) -> Steps:
    """DPM-Solver++(2M) (Lu et al. 2022): exponential integrator in λ = −log σ with a second-order
    multistep correction; first order on the first step and on the final step to σ = 0. It is the
    η = 0 case of `sample_dpmpp_2m_sde`: the midpoint correction −½(e^{−h} − 1)/r·(D − D_prev)
    equals 2M's (1 + 1/2r)·D − (1/2r)·D_prev."""
    return (yield from sample_dpmpp_2m_sde.steps(denoiser, x, sigmas, eta=0.0))


@stepwise
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None,
                        eta: float = 1.0) -> Steps:
    """DPM-Solver++(2M) SDE, midpoint variant; pair it with Brownian-tree noise so that samples
    converge as the step count grows. η = 0 is the ODE solver DPM-Solver++(2M)."""
    noise = noise or iid_noise(x)
    old_denoised, h_last = None, None
    host = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if host[i + 1] == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            x = (sigma_next / sigma) * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(host[i], host[i + 1]) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt()
            h_last = h
        old_denoised = denoised
        yield _info(i, sigmas, x, denoised)
    return x


SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
STOCHASTIC = {"ddim", "dpmpp_2m_sde"}
