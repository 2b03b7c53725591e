"""First Block Cache: skip the rest of the backbone on denoising steps whose first block barely changed.

Each step runs the first decoder block. A row whose first-block residual changed by less than τ
(relative L1) since that row's last fully computed step reuses its cached residual of the
remaining blocks (Flux: 1.55× at τ = 0.08). The decision is per row, so a row's output never
depends on the rest of the batch, and only the rows that miss run the remaining blocks. A change
of batch shape (the unconditional branch switching on or off under a guidance interval) is a miss.
"""

from __future__ import annotations

import torch
from torch import Tensor


class FirstBlockCache:
    """State for one sampling run.

    `hit_rate`: share of row-steps that reused their cache (the share of the remaining blocks'
    work saved); `skip_rate`: share of steps on which every row reused.
    """

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.first: Tensor | None = None  # (R, ...) first-block residual at each row's last computed step
        self.rest: Tensor | None = None  # (R, ...) residual of the remaining blocks at that step
        self.calls = self.skipped = self.row_calls = self.row_hits = 0

    def decide(self, first_residual: Tensor) -> Tensor:
        """Per-row reuse mask (R,) for this step's first-block residual (R, ...)."""
        self.calls += 1
        self.row_calls += first_residual.shape[0]
        hit = torch.zeros(first_residual.shape[0], dtype=torch.bool, device=first_residual.device)
        if self.first is None or self.first.shape != first_residual.shape or self.threshold == 0:
            return hit
        dims = tuple(range(1, first_residual.dim()))
        change = (first_residual - self.first).abs().mean(dims) / self.first.abs().mean(dims).clamp_min(1e-12)
        hit = change < self.threshold
        self.row_hits += int(hit.sum())
        self.skipped += int(bool(hit.all()))
        return hit

    def update(self, first_residual: Tensor, rest_residual: Tensor, hit: Tensor) -> None:
        """Keep the fresh residuals of the rows that missed (rows that hit keep their cached ones)."""
        if self.first is None or self.first.shape != first_residual.shape:
            self.first, self.rest = first_residual, rest_residual
            return
        keep = hit.view((-1,) + (1,) * (first_residual.dim() - 1))
        self.first = torch.where(keep, self.first, first_residual)
        self.rest = torch.where(keep, self.rest, rest_residual)

    @property
    def hit_rate(self) -> float:
        return self.row_hits / self.row_calls if self.row_calls else 0.0

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.calls if self.calls else 0.0
