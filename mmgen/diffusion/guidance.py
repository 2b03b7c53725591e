"""Guidance on denoised predictions: CFG, APG, CFG rescale, dynamic thresholding, guidance interval.

Pinned conventions (all on D = predicted x0, per sample):
  CFG:      D = D_u + w·(D_c − D_u)                               (diffusers; w = 1 is no guidance)
  APG:      Δ = D_c − D_u; momentum b = Δ + β·b, Δ = b; norm cap Δ *= min(1, r/‖Δ‖);
            Δ = Δ∥ + Δ⊥ with Δ∥ along D_c; D = D_c + (w − 1)·(Δ⊥ + η·Δ∥)   (arXiv 2410.02416)
            η = 1, r = 0, β = 0 is CFG exactly.
  rescale:  D_r = D·std(D_c)/std(D); D = φ·D_r + (1 − φ)·D          (Lin et al. 2023)
  imagen:   s = max(1, quantile(|D|, p)); D = clamp(D, −s, s) / s   (pixel space)
  mimic:    per sample and channel, clamp the centered result at max(quantile(|Ã|, p), max|T̃|) and
            rescale it to the range of the same guidance at the safe scale m; add the mean back.
  interval: guide only for σ_lo ≤ σ ≤ σ_hi; elsewhere D = D_c and the unconditional branch is skipped.
Every field is checked when a `Guidance` is made (OptionError naming the field, value and range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from mmgen.errors import OptionError, check_choice, check_number

# (x, σ, with_uncond) -> (D_c, D_u or None): one batched model call for both branches.
Branches = Callable[[Tensor, Tensor, bool], "tuple[Tensor, Tensor | None]"]
MAX_SCALE = 100.0  # typical scales are 1-15; far beyond, D_c − D_u times w overflows half precision


@dataclass
class Guidance:
    """How the conditional and unconditional predictions are combined.

    Args:
        scale: w in [0, MAX_SCALE]; 1 turns guidance off (and the unconditional branch with it), 0 is
            the unconditional prediction.
        kind: "cfg" or "apg".
        eta: APG weight η in [0, 1] of the component of Δ parallel to D_c (1: as CFG).
        norm_threshold: APG norm cap r ≥ 0 (0 = none).
        momentum: APG momentum β in (−1, 1) (0 = none; the paper uses −0.5 to −0.75).
        rescale: CFG-rescale φ in [0, 1] (0 = off).
        threshold: None, "imagen" (pixel space) or "mimic" (latents, per channel).
        percentile: p in (0, 1] of dynamic thresholding.
        mimic_scale: m in [0, MAX_SCALE], the safe reference scale of "mimic".
        interval: (σ_lo, σ_hi) with 0 ≤ σ_lo < σ_hi, finite, where guidance applies; None: everywhere.
    """

    scale: float = 3.0
    kind: str = "cfg"
    eta: float = 1.0
    norm_threshold: float = 0.0
    momentum: float = 0.0
    rescale: float = 0.0
    threshold: str | None = None
    percentile: float = 0.995
    mimic_scale: float = 1.0
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_number("guidance scale", self.scale, low=0, high=MAX_SCALE)
        check_choice("guidance kind", self.kind, ("cfg", "apg"))
        check_number("guidance eta", self.eta, low=0, high=1)
        check_number("guidance norm_threshold", self.norm_threshold, low=0)
        check_number("guidance momentum", self.momentum, low=-1, high=1, low_open=True, high_open=True)
        check_number("guidance rescale", self.rescale, low=0, high=1)
        check_choice("guidance threshold", self.threshold, (None, "imagen", "mimic"))
        check_number("guidance percentile", self.percentile, low=0, high=1, low_open=True)
        check_number("guidance mimic_scale", self.mimic_scale, low=0, high=MAX_SCALE)
        if self.interval is not None:
            self.interval = check_interval(self.interval)

    def active(self, sigma: Tensor | float) -> bool:
        """Whether this step is guided (and so needs the unconditional branch)."""
        if self.scale == 1.0:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo <= float(sigma) <= hi

    def denoiser(self, branches: Branches) -> Callable[[Tensor, Tensor], Tensor]:
        """A D(x, σ) for the samplers, holding this run's APG momentum."""
        state: dict[str, Tensor] = {}

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            if not self.active(sigma):
                return branches(x, sigma, False)[0]
            cond, uncond = branches(x, sigma, True)
            return self.combine(cond, uncond, state)

        return denoise

    def combine(self, cond: Tensor, uncond: Tensor, state: dict | None = None) -> Tensor:
        """Guided prediction from D_c and D_u, (N, ...) each."""
        if self.kind == "cfg":
            out = cond + (self.scale - 1) * (cond - uncond)  # = D_u + w·(D_c − D_u)
        else:
            out = cond + (self.scale - 1) * self._apg_update(cond, uncond, state if state is not None else {})
        if self.rescale:
            out = self._rescale(out, cond)
        if self.threshold == "imagen":
            out = imagen_threshold(out, self.percentile)
        elif self.threshold == "mimic":
            reference = uncond + self.mimic_scale * (cond - uncond)
            out = mimic_threshold(out, reference, self.percentile)
        return out

    def _apg_update(self, cond: Tensor, uncond: Tensor, state: dict) -> Tensor:
        delta = cond - uncond
        if self.momentum:
            delta = delta + self.momentum * state["buf"] if "buf" in state else delta
            state["buf"] = delta
        dims = tuple(range(1, delta.dim()))
        if self.norm_threshold > 0:
            norm = delta.pow(2).sum(dims, keepdim=True).sqrt()
            delta = delta * torch.clamp(self.norm_threshold / norm.clamp_min(1e-12), max=1.0)
        if self.eta == 1.0:
            return delta  # Δ∥ + Δ⊥ = Δ: skip the projection, so APG with η = 1 is CFG bit for bit
        unit = cond / cond.pow(2).sum(dims, keepdim=True).sqrt().clamp_min(1e-12)
        parallel = (delta * unit).sum(dims, keepdim=True) * unit
        return (delta - parallel) + self.eta * parallel

    def _rescale(self, out: Tensor, cond: Tensor) -> Tensor:
        dims = tuple(range(1, out.dim()))
        rescaled = out * cond.std(dims, keepdim=True) / out.std(dims, keepdim=True).clamp_min(1e-12)
        return self.rescale * rescaled + (1 - self.rescale) * out


def check_interval(interval: Any) -> tuple[float, float]:
    """(σ_lo, σ_hi) as floats; raises OptionError unless they are two finite σs with 0 ≤ σ_lo < σ_hi."""
    rule = "must be None (guide at every step) or two finite sigmas (lo, hi) with 0 <= lo < hi, e.g. (0.3, 5.0)"
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        raise OptionError(f"guidance interval = {interval!r:.80}: {rule}")
    for name, sigma in zip(("lo", "hi"), interval):
        check_number(f"guidance interval {name}", sigma, low=0)
    lo, hi = float(interval[0]), float(interval[1])
    if lo >= hi:
        raise OptionError(f"guidance interval = {interval!r}: {rule}")
    return lo, hi


def imagen_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: s = max(1, quantile(|x0|, p)) per sample, clamp to ±s, divide by s."""
    flat = x0.flatten(1).abs()
    s = torch.quantile(flat.float(), percentile, dim=1).clamp_min(1.0).to(x0.dtype)
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return x0.clamp(-s, s) / s


def mimic_threshold(x0: Tensor, reference: Tensor, percentile: float = 0.995) -> Tensor:
    """"Mimic scale" dynamic thresholding for latents, per sample and channel (dims ≥ 2 pooled)."""
    a = x0.flatten(2)  # (N, C, P)
    t = reference.flatten(2)
    mean = a.mean(-1, keepdim=True)
    a_c, t_c = a - mean, t - t.mean(-1, keepdim=True)
    t_max = t_c.abs().amax(-1, keepdim=True)
    limit = torch.maximum(torch.quantile(a_c.abs().float(), percentile, dim=-1, keepdim=True).to(a.dtype), t_max)
    out = a_c.clamp(-limit, limit) / limit.clamp_min(1e-12) * t_max + mean
    return out.view_as(x0)
