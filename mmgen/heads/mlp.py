"""Per-token MLP diffusion head (MAR, Li et al. 2024; HART's residual head).

A small denoiser over one token's continuous vector x (M, P), conditioned on a vector z (M, Dz),
usually the backbone's hidden state at the position that predicts the token:

    c = time_mlp(t) + cond_proj(z)
    h = proj_in(x_t)
    depth × residual block:  h = h + gate(c) · MLP(LN(h)·(1 + scale(c)) + shift(c))     (adaLN)
    out = proj_out(LN(h)·(1 + scale(c)) + shift(c))                                      (zero-init)

Contract: `loss(target, z)` -> per-token loss (M,), each token repeated `repeat` times at independent
noise levels (MAR's diffusion_batch_mul); `sample(z, steps, guidance, temperature)` -> (M, P), any
sampler of `mmgen.diffusion.samplers`, CFG against an unconditional z, temperature scaling the
starting noise (MAR: 0.95 without CFG).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmgen.config import HeadConfig
from mmgen.diffusion.guidance import Guidance
from mmgen.diffusion.noise import iid_noise
from mmgen.diffusion.objective import Objective
from mmgen.diffusion.samplers import SAMPLERS, STOCHASTIC
from mmgen.diffusion.schedules import make_sigmas
from mmgen.heads.timestep import timestep_features


class AdaLNBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)  # 3 × (M, W)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class MLPHead(nn.Module):
    """Denoiser for single tokens of `token_dim` values, conditioned on `cond_dim`-vectors."""

    def __init__(self, token_dim: int, cond_dim: int, cfg: HeadConfig, time_features: int = 256):
        super().__init__()
        self.cfg, self.token_dim, self.time_features = cfg, token_dim, time_features
        self.objective = Objective(cfg.objective)
        w = cfg.width
        self.proj_in = nn.Linear(token_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(time_features, w), nn.SiLU(), nn.Linear(w, w))
        self.cond_proj = nn.Linear(cond_dim, w)
        self.blocks = nn.ModuleList(AdaLNBlock(w) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.proj_out = nn.Linear(w, token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:  # every block starts as the identity (adaLN-Zero)
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Model output (ε, v or flow velocity) for x_t (M, P) at time t (M,) given z (M, Dz)."""
        c = self.time_mlp(timestep_features(t, self.time_features).to(x_t.dtype)) + self.cond_proj(z)  # (M, W)
        h = self.proj_in(x_t)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.proj_out(self.final_norm(h) * (1 + scale) + shift)

    def loss(self, target: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-token denoising loss (M,), averaged over `repeat` noise levels and the P values."""
        r, m = self.cfg.repeat, len(target)
        x0 = target.float().repeat(r, 1)  # (r·M, P): repeat k of token i sits at row k·M + i
        z = z.repeat(r, 1)
        t = torch.rand(r * m, generator=generator, device=target.device)
        noise = torch.randn(x0.shape, generator=generator, device=target.device)
        x_t, goal = self.objective.add_noise(x0, t, noise)
        err = (self(x_t.to(z.dtype), t, z).float() - goal).pow(2).mean(-1)  # (r·M,)
        return err.view(r, m).mean(0)

    def denoiser(self, z: Tensor, z_uncond: Tensor | None, guidance: Guidance):
        """D(x, σ) -> x0 for the samplers; CFG/APG against z_uncond when guidance is active."""
        obj = self.objective

        def branches(x: Tensor, sigma: Tensor, with_uncond: bool) -> tuple[Tensor, Tensor | None]:
            both = with_uncond and z_uncond is not None
            cond = torch.cat([z, z_uncond]) if both else z
            xx = torch.cat([x, x]) if both else x
            t = obj.t_from_sigma(sigma.double()).float().expand(len(xx))
            a, _ = obj.alpha_sigma(t)
            x_t = xx * a[:, None]
            x0 = obj.to_x0(x_t, self(x_t.to(cond.dtype), t, cond).float(), t)
            return (x0[: len(x)], x0[len(x):]) if both else (x0, None)

        return guidance.denoiser(branches)

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        steps: int | None = None,
        guidance: float | Guidance = 1.0,
        temperature: float = 1.0,
        z_uncond: Tensor | None = None,
        generators: Sequence[torch.Generator] | None = None,
        sampler: str = "euler",
    ) -> Tensor:
        """Draw one token per row of z (M, Dz) -> (M, P). Row i's noise comes from generators[i]."""
        guidance = guidance if isinstance(guidance, Guidance) else Guidance(scale=float(guidance))
        if guidance.scale != 1 and z_uncond is None:
            raise ValueError("guidance needs z_uncond, the unconditional condition vectors")
        sigmas = make_sigmas(self.objective, steps or self.cfg.steps).to(z.device)
        if generators is None:
            noise = torch.randn(len(z), self.token_dim, device=z.device)
        else:
            noise = torch.stack([torch.randn(self.token_dim, generator=g, device=z.device) for g in generators])
        x = noise * sigmas[0].float() * temperature
        extra = {"noise": iid_noise(x, generators)} if sampler in STOCHASTIC else {}
        return SAMPLERS[sampler](self.denoiser(z, z_uncond, guidance), x, sigmas, **extra)
