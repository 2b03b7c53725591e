"""Image and codebook metrics: PSNR, SSIM, Fréchet Wavelet Distance, codebook usage and perplexity.

Images are float tensors (N, C, H, W) in [-1, 1]; per-image metrics return (N,) float32. None of
them downloads a network: FWD uses pytorchfwd's Haar packet transform and Fréchet distance.
This module imports no other mmgen module (tokenizers are used through `encode` only).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from mmgen.tokenizers.image import ImageTokenizer

PSNR_CAP = 100.0  # dB, reported for identical images (MSE 0)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB (N,) of images in [-1, 1] (peak = full range); capped at PSNR_CAP."""
    mse = ((x.double() - y.double()) / 2).pow(2).flatten(1).mean(1)  # on the [0, 1] scale
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP / 10)))).float()


def _gaussian_window(size: int, sigma: float) -> Tensor:
    """Normalized 1-D Gaussian (size,), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x.pow(2) / (2 * sigma**2))
    return w / w.sum()


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (N,) of images in [-1, 1], Wang et al. 2004: an 11-tap Gaussian window
    (σ = 1.5), K1 = 0.01, K2 = 0.03, data range 1 (images mapped to [0, 1]), population
    (co)variances, mean over the valid (unpadded) map and over channels. Equals scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)`, whose border crop leaves exactly the valid map. Images smaller than the
    window use the largest odd window that fits (7 for 8×8 digits)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two image batches of the same shape (N, C, H, W), got {x.shape} and {y.shape}")
    n, c, h, w = x.shape
    size = min(window, h - (1 - h % 2), w - (1 - w % 2))
    if size < 3:
        raise ValueError(f"images of {h}×{w} are too small for SSIM (need at least 3×3)")
    g = _gaussian_window(size, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()  # (C, 1, k, k) depthwise

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=c)  # (N, C, H−k+1, W−k+1)

    a, b = (x.double() + 1) / 2, (y.double() + 1) / 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def fwd_level(resolution: int) -> int:
    """Wavelet packet level for FWD: pytorchfwd's default 4, fewer for small images (2×2 packets)."""
    return max(1, min(4, int(math.log2(resolution)) - 1))


def frechet_wavelet_distance(real: Tensor, fake: Tensor, level: int | None = None) -> float | None:
    """FWD (Veeramacheneni et al. 2025) between two image sets in [-1, 1], with pytorchfwd's Haar
    packet transform and Fréchet distance (its CLI defaults: Haar, no log scale), averaged over
    packets. `level` defaults to `fwd_level(resolution)`. Returns None when pytorchfwd is not installed.

    Only `pytorchfwd.freq_math` is imported: `pytorchfwd.fwd` imports torchvision and sets torch's
    global default dtype to float64 at import time.
    """
    try:
        from pytorchfwd.freq_math import calculate_frechet_distance, forward_wavelet_packet_transform
    except ImportError:
        return None
    level = level or fwd_level(real.shape[-1])

    def stats(images: Tensor):
        x = ((images.double().clamp(-1, 1) + 1) / 2).cpu()  # [0, 1], as pytorchfwd's ToTensor gives
        packets = forward_wavelet_packet_transform(x, "Haar", level, False)  # (N, P, C, h, w)
        p = packets.permute(1, 0, 2, 3, 4).flatten(2)  # (P, N, C·h·w)
        return p.mean(1).numpy(), torch.stack([torch.cov(q.T) for q in p]).numpy()

    (mu1, s1), (mu2, s2) = stats(real), stats(fake)
    return float(sum(calculate_frechet_distance(mu1[i], s1[i], mu2[i], s2[i]) for i in range(len(mu1))) / len(mu1))


def code_statistics(codes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(usage, perplexity) of a set of codes in [0, k): the share of the k codes used at least once,
    and exp(entropy) of their histogram (k when all are used equally, 1 when one code is)."""
    counts = torch.bincount(codes.flatten(), minlength=k).float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return (counts > 0).float().mean(), entropy.exp()


@torch.inference_mode()
def code_statistics_of(tokenizer: ImageTokenizer, images: Tensor, batch_size: int = 256) -> dict[str, float]:
    """{"usage", "perplexity"} (rounded for reports) over all codes a discrete tokenizer gives `images`."""
    codes = torch.cat([tokenizer.encode(images[i : i + batch_size].to(tokenizer.device)).codes.cpu()
                       for i in range(0, len(images), batch_size)])
    usage, perplexity = code_statistics(codes, tokenizer.config.codebook_size)
    return {"usage": round(float(usage), 4), "perplexity": round(float(perplexity), 1)}
