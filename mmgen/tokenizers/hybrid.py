"""HART's hybrid tokenizer: discrete codes plus the continuous residual they leave behind.

z = encoder(x); codes = nearest codebook entries; residual = z − dequantize(codes), so
dequantize(codes) + residual == z exactly and decode(encode(x)) == decoder(z). The residual is
handed out normalized, residual·latent_scale (latent_shift = 0), with the scale measured on data.
Training decodes the continuous z for a random half of each batch and the quantized z for the
other half (HART's alternation), so the one decoder serves both; without a residual, `decode`
is the VQ-only reconstruction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmgen.tokenizers.image import ImageTokens
from mmgen.tokenizers.vq import VQTokenizer, reconstruction_loss


class HybridTokenizer(VQTokenizer):
    """kind "hybrid": encode -> ImageTokens(codes (N, g, g), latents = normalized residual (N, c, g, g))."""

    continuous_share = 0.5  # probability that a training image is decoded from the continuous z

    def split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent z (N, c, g, g) -> (codes (N, g, g), unnormalized residual z − dequantize(codes))."""
        codes = self.quantizer.lookup(z)
        return codes, z - self.quantizer.dequantize(codes).to(z.dtype)

    def encode(self, images: Tensor) -> ImageTokens:
        codes, residual = self.split(self.latent(images))
        cfg = self.config
        return ImageTokens(codes=codes, latents=(residual.float() - cfg.latent_shift) * cfg.latent_scale)

    def decode(self, tokens: ImageTokens) -> Tensor:
        """decoder(dequantize(codes) + residual); with latents None, the VQ-only decode."""
        if tokens.codes is None:
            raise ValueError("the 'hybrid' tokenizer decodes codes (plus an optional residual); ImageTokens.codes is None")
        q = self.dequantize(tokens.codes)  # (N, c, g, g)
        if tokens.latents is None:
            return self.decoder(q)
        if tokens.latents.shape != q.shape:
            raise ValueError(f"residual latents must have shape {tuple(q.shape)} to match the codes, "
                             f"got {tuple(tokens.latents.shape)}")
        residual = tokens.latents.to(q.dtype) / self.config.latent_scale + self.config.latent_shift
        return self.decoder(q + residual)

    def loss(self, images: Tensor, step: int = 0) -> dict[str, Tensor]:
        z = self.latent(images)  # (N, c, g, g)
        z_q, _, parts = self.quantizer(z, step)
        continuous = torch.rand(len(z), device=z.device) < self.continuous_share  # (N,)
        recon = self.decoder(torch.where(continuous[:, None, None, None], z, z_q))
        rec = reconstruction_loss(recon, images)
        loss = rec + parts["codebook"] + self.beta * parts["commit"]
        with torch.no_grad():
            per_image = (recon.float() - images.float()).abs().flatten(1).mean(1)  # (N,) L1, for logging
            logs = {"rec": rec.detach(),
                    "l1_continuous": per_image[continuous].mean() if continuous.any() else per_image.new_tensor(float("nan")),
                    "l1_vq": per_image[~continuous].mean() if (~continuous).any() else per_image.new_tensor(float("nan"))}
        return {"loss": loss, **logs, **{k: v.detach() for k, v in parts.items()}}

    @torch.no_grad()
    def calibrate(self, images: Tensor, batch_size: int = 256) -> None:
        """latent_shift = 0 and latent_scale = 1 / std of the residual on `images`."""
        res = torch.cat([self.split(self.latent(images[i : i + batch_size]))[1].float()
                         for i in range(0, len(images), batch_size)])
        self.config.latent_shift = 0.0
        self.config.latent_scale = float(1.0 / res.std().clamp_min(1e-8))
