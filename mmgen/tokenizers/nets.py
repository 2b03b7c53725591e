"""Convolutional encoder and decoder shared by the trained image tokenizers (VQGAN/SD-VAE style).

Encoder: conv_in, then log2(f) stages of `res_blocks` residual blocks followed by a stride-2
conv, each stage doubling the width; a middle stage; GroupNorm + SiLU + conv_out. The decoder
mirrors it with nearest-neighbour ×2 upsampling + conv. Shapes: N images, C image channels,
R pixels per side, f = downsample, g = R / f latent cells per side, c latent channels.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


def _groups(channels: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 groups dividing `channels`."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def stage_widths(width: int, downsample: int) -> list[int]:
    """Channels of each resolution level, full resolution first: width·2^i for i = 0..log2(f)."""
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"downsample must be a power of 2, got {downsample}")
    return [width * 2**i for i in range(int(math.log2(downsample)) + 1)]


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1×1 skip when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """Images (N, C, R, R) -> features (N, out_channels, R/f, R/f)."""

    def __init__(self, channels: int, width: int, res_blocks: int, downsample: int, out_channels: int):
        super().__init__()
        widths = stage_widths(width, downsample)
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [ResBlock(cin, cin) for _ in range(res_blocks)]
            layers.append(nn.Conv2d(cin, cout, 3, stride=2, padding=1))  # halves the side
        layers += [ResBlock(widths[-1], widths[-1]) for _ in range(max(res_blocks, 1))]  # middle
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(widths[-1]), widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.conv_in(x))  # (N, width·f, g, g)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))  # (N, out_channels, g, g)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, cout, 2h, 2w)


class Decoder(nn.Module):
    """Latents (N, c, g, g) -> images (N, C, g·f, g·f), unbounded (trained towards [-1, 1])."""

    def __init__(self, channels: int, width: int, res_blocks: int, downsample: int, latent_channels: int):
        super().__init__()
        widths = stage_widths(width, downsample)[::-1]  # coarsest first
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = [ResBlock(widths[0], widths[0]) for _ in range(max(res_blocks, 1))]  # middle
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [ResBlock(cin, cin) for _ in range(res_blocks)]
            layers.append(Upsample(cin, cout))  # doubles the side
        layers += [ResBlock(widths[-1], widths[-1]) for _ in range(res_blocks)]  # full resolution
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(widths[-1]), widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.blocks(self.conv_in(z))  # (N, width, R, R)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))  # (N, C, R, R)
