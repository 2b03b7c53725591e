"""First Block Cache: skip the rest of the backbone on denoising steps whose first block barely changed.

Each step runs the first decoder block; if the relative L1 change of its residual since the last
fully computed step is below τ, the cached residual of the remaining blocks is added instead of
running them (Flux: 1.55× at τ = 0.08). A change of batch shape (e.g. the unconditional branch
switching on or off under a guidance interval) is always a miss.
"""

from __future__ import annotations

from torch import Tensor


class FirstBlockCache:
    """State for one sampling run. `hits / calls` is the share of steps that reused the cache."""

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.first: Tensor | None = None  # first-block residual at the last computed step
        self.rest: Tensor | None = None  # residual of the remaining blocks at that step
        self.calls = self.hits = 0

    def reusable(self, first_residual: Tensor) -> bool:
        """Count a call; True if the remaining blocks may be skipped for this first-block residual."""
        self.calls += 1
        if self.first is None or self.first.shape != first_residual.shape or self.threshold == 0:
            return False
        change = (first_residual - self.first).abs().mean() / self.first.abs().mean().clamp_min(1e-12)
        if change.item() < self.threshold:
            self.hits += 1
            return True
        return False

    def store(self, first_residual: Tensor, rest_residual: Tensor) -> None:
        self.first, self.rest = first_residual, rest_residual

    @property
    def hit_rate(self) -> float:
        return self.hits / self.calls if self.calls else 0.0
