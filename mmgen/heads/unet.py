"""U-Net down and up blocks around the backbone: the Transfusion patch encoder / decoder (§4.3).

The linear patch layer sees each p×p patch alone. These blocks see the whole latent image: the encoder
runs timestep-conditioned residual conv blocks, halving the grid until one cell is one patch, and its
output at each cell is that patch's token; the decoder mirrors it from the backbone's hidden states back
to the latent grid, taking the encoder's maps at each resolution as skips (concatenated, as in a U-Net),
so fine detail need not pass through the tokens. Channels start at `channels` and double per level.

The skips also let the decoder denoise from the noisy input alone, around the backbone and so around the
caption: at small scale the model then learns to draw textures that follow the prompt poorly (measured in
docs/emoji.md). `skips=False` keeps the conv blocks and drops the skips, so everything the decoder gets
passes through the tokens.

    encode: x_t (N, c, G, G), time (N, D) -> tokens (N, L, D), skips [(N, C_k, G/2^k, G/2^k) for each level k]
            (an empty list without skips)
    decode: hidden (N, L, D), time (N, D), skips -> prediction (N, c, G, G)    (last conv zero-initialized)

with L = (G/p)² and p = 2^levels (patch_size must be a power of two).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus a per-channel shift from the time embedding, twice, with a residual."""

    def __init__(self, c_in: int, c_out: int, time_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(time))[:, :, None, None]  # (N, C_out, H, W)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNetPatches(nn.Module):
    """Encoder and decoder of `levels` = log2(patch_size) resolutions between the latents and the tokens."""

    def __init__(self, latent_channels: int, patch_size: int, hidden_size: int, channels: int = 32,
                 skips: bool = True):
        super().__init__()  # patch_size: a power of two (`ImageConfig` checks it)
        self.levels, self.skips = patch_size.bit_length() - 1, skips
        widths = [channels * 2**k for k in range(self.levels + 1)]  # C_0 .. C_levels
        d = hidden_size
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(widths[k], widths[k], d) for k in range(self.levels + 1))
        self.downsample = nn.ModuleList(nn.Conv2d(widths[k], widths[k + 1], 3, stride=2, padding=1)
                                        for k in range(self.levels))
        self.to_tokens = nn.Linear(widths[-1], d)
        self.from_tokens = nn.Linear(d, widths[-1])
        into = 2 if skips else 1  # an up block's input: its own maps, and the skip concatenated
        self.up = nn.ModuleList(ResBlock(into * widths[k], widths[k], d) for k in range(self.levels + 1))
        self.upsample = nn.ModuleList(nn.Conv2d(widths[k + 1], widths[k], 3, padding=1) for k in range(self.levels))
        self.norm_out, self.conv_out = _norm(widths[0]), nn.Conv2d(widths[0], latent_channels, 3, padding=1)

    def init_weights(self) -> None:
        """Conv layers keep PyTorch's default init (the model's normal(0, 0.02) covers Linear only); the
        output conv starts at zero, so the first prediction is zero (DiT-style, as the linear patch layer)."""
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def encode(self, x: Tensor, time: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x (N, c, G, G), time (N, D) -> tokens (N, L, D) and the skips of each level."""
        h, skips = self.conv_in(x), []
        for k, block in enumerate(self.down):
            h = block(h, time)  # (N, C_k, G/2^k, G/2^k)
            if self.skips:
                skips.append(h)
            if k < self.levels:
                h = self.downsample[k](h)
        return self.to_tokens(rearrange(h, "n c h w -> n (h w) c")), skips  # (N, L, D)

    def decode(self, hidden: Tensor, time: Tensor, skips: list[Tensor]) -> Tensor:
        """hidden (N, L, D) at the image slots -> prediction (N, c, G, G)."""
        side = math.isqrt(hidden.shape[1])
        h = rearrange(self.from_tokens(hidden), "n (h w) c -> n c h w", h=side, w=side)  # (N, C_levels, G/p, G/p)
        for k in reversed(range(self.levels + 1)):
            h = self.up[k](torch.cat([h, skips[k]], dim=1) if self.skips else h, time)  # (N, C_k, G/2^k, G/2^k)
            if k > 0:
                h = self.upsample[k - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (N, C_{k-1}, ...)
        return self.conv_out(F.silu(self.norm_out(h)))
