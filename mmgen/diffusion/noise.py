"""Noise for stochastic samplers: `noise(σ, σ_next) -> unit Gaussian` shaped like x.

`iid_noise` draws fresh noise every step. `BrownianTreeNoise` reads increments of one fixed
Brownian path per row and seed (torchsde's Brownian tree over σ): the same seed gives the same
path whatever the step count, so SDE samples converge as steps grow.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def iid_noise(like: Tensor, generators: torch.Generator | Sequence[torch.Generator] | None = None):
    """Fresh N(0, I) every call, shaped like `like`; with a list, row i draws from generators[i]."""
    if generators is None or isinstance(generators, torch.Generator):
        return lambda sigma, sigma_next: torch.randn(
            like.shape, generator=generators, device=like.device, dtype=like.dtype
        )
    return lambda sigma, sigma_next: torch.stack(
        [torch.randn(like.shape[1:], generator=g, device=like.device, dtype=like.dtype) for g in generators]
    )


class BrownianTreeNoise:
    """Normalized Brownian increments (W(σ_b) − W(σ_a)) / sqrt(|σ_b − σ_a|), one tree per row.

    Args:
        like: a tensor shaped like the sample, (R, ...).
        sigma_min, sigma_max: the range the path covers (the smallest non-zero σ and the largest).
        seeds: one seed per row; a row's noise depends only on its seed.
    """

    def __init__(self, like: Tensor, sigma_min: float, sigma_max: float, seeds: Sequence[int]):
        import torchsde

        if len(seeds) != like.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {like.shape[0]} rows")
        # a hair wider than asked, so σs that round differently still fall inside the tree
        self.lo, self.hi = float(sigma_min) * (1 - 1e-6), float(sigma_max) * (1 + 1e-6)
        self.dtype = like.dtype
        w0 = torch.zeros(like.shape[1:], dtype=torch.float64, device=like.device)
        self.trees = [torchsde.BrownianTree(t0=self.lo, w0=w0, t1=self.hi, entropy=int(s), tol=1e-6) for s in seeds]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        a, b = sorted((float(sigma), float(sigma_next)))
        a, b = max(a, self.lo), min(b, self.hi)
        if b <= a:
            raise ValueError(f"σ interval [{a}, {b}] is empty or outside the tree's [{self.lo}, {self.hi}]")
        w = torch.stack([tree(a, b) for tree in self.trees]) / (b - a) ** 0.5
        return w.to(self.dtype)
