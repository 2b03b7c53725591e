"""A diffusers `AutoencoderKL` (SD / SDXL / Flux VAE) as an image tokenizer, from a local directory.

`config.path` is a directory written by `AutoencoderKL.save_pretrained` (nothing is downloaded).
Latents are the posterior mean, normalized as (z − latent_shift)·latent_scale; left at their
defaults (shift 0, scale 1) these are taken from the VAE's `shift_factor` and `scaling_factor`
(SD: 0.18215). The VAE always runs in float32, whatever dtype the surrounding model is cast to:
the SDXL VAE overflows to NaN in fp16 (and bf16 costs it visible accuracy).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mmgen.config import ImageTokenizerConfig
from mmgen.tokenizers.image import ImageTokenizer, ImageTokens

INSTALL_HINT = 'the "diffusers" image tokenizer needs the diffusers package: pip install "mmgen[diffusers]"'


def load_autoencoder_kl(path: str | Path):
    """`AutoencoderKL.from_pretrained(path)` from a local directory only, with clear errors."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'} is missing: `path` must be a local directory saved by "
                                "diffusers' AutoencoderKL.save_pretrained (e.g. a checkpoint's vae/ folder)")
    return AutoencoderKL.from_pretrained(str(d), local_files_only=True, torch_dtype=torch.float32)


class DiffusersVAETokenizer(ImageTokenizer):
    """kind "diffusers": encode -> ImageTokens(latents (N, c, g, g)); decode(latents) -> images (N, C, R, R)."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__(config)
        if not config.path:
            raise ValueError("the 'diffusers' image tokenizer needs config.path: a local AutoencoderKL directory")
        self.vae = load_autoencoder_kl(config.path).eval()
        vc = self.vae.config
        expected = {"channels": vc.in_channels, "latent_channels": vc.latent_channels,
                    "downsample": 2 ** (len(vc.block_out_channels) - 1)}
        wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
        if wrong:
            raise ValueError(f"config does not match the AutoencoderKL in {config.path} "
                             f"(field: (config, VAE)): {wrong}; set these fields to the VAE's values")
        if config.latent_scale == 1.0 and config.latent_shift == 0.0:  # unset: take the VAE's own
            config.latent_scale = float(vc.scaling_factor)
            config.latent_shift = float(vc.get("shift_factor") or 0.0)

    def _apply(self, fn, recurse: bool = True):
        """Follow device moves but never dtype casts: the VAE stays float32 (SDXL's makes NaNs in fp16)."""

        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            return t.to(out.device) if t.is_floating_point() and out.dtype != t.dtype else out

        return super()._apply(keep_dtype, recurse)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def encode(self, images: Tensor) -> ImageTokens:
        self.check_images(images)
        mean = self.vae.encode(images.float()).latent_dist.mean  # (N, c, g, g)
        return ImageTokens(latents=(mean - self.config.latent_shift) * self.config.latent_scale)

    def decode(self, tokens: ImageTokens) -> Tensor:
        z = tokens.latents
        c, g = self.config.latent_channels, self.config.grid
        if z is None or z.dim() != 4 or tuple(z.shape[1:]) != (c, g, g):
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"the 'diffusers' tokenizer decodes latents of shape (N, {c}, {g}, {g}), got {got}")
        return self.vae.decode(z.float() / self.config.latent_scale + self.config.latent_shift).sample

    def calibrate(self, images: Tensor) -> None:
        """Nothing to do: the scale comes from the VAE's config (or was set explicitly)."""
