"""KL autoencoder (SD-VAE style, no perceptual or adversarial loss): continuous latents.

The encoder predicts a diagonal Gaussian posterior (mean, log-variance) per latent cell; training
decodes a sample of it, `loss = L1 + L2 reconstruction + kl_weight · KL(q(z|x) ‖ N(0, I))`.
`encode` returns the posterior mean, normalized as (z − latent_shift)·latent_scale, both measured
on data by `calibrate` after training (SD's 0.18215 plays the role of latent_scale).
Shapes: N images, C channels, R pixels per side, g = R / downsample cells, c latent channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmgen.config import ImageTokenizerConfig
from mmgen.tokenizers.image import ImageTokenizer, ImageTokens
from mmgen.tokenizers.nets import Decoder, Encoder
from mmgen.tokenizers.vq import reconstruction_loss


class VAETokenizer(ImageTokenizer):
    """kind "vae": encode -> ImageTokens(latents (N, c, g, g)); decode(latents) -> images (N, C, R, R).

    `kl_weight` follows SD's convention (1e-6 on the per-image KL sum against a per-pixel
    reconstruction sum), here applied to means: kl_weight · KL_sum / pixels_per_image.
    """

    kl_weight = 1e-6

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__(config)
        c = config
        self.encoder = Encoder(c.channels, c.width, c.res_blocks, c.downsample, 2 * c.latent_channels)
        self.decoder = Decoder(c.channels, c.width, c.res_blocks, c.downsample, c.latent_channels)

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar), each (N, c, g, g), of q(z | images)."""
        self.check_images(images)
        h = self.encoder(images.to(self.encoder.conv_in.weight.dtype))  # (N, 2c, g, g)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: Tensor) -> ImageTokens:
        mean, _ = self.posterior(images)
        return ImageTokens(latents=(mean.float() - self.config.latent_shift) * self.config.latent_scale)

    def decode(self, tokens: ImageTokens) -> Tensor:
        z = tokens.latents
        c, g = self.config.latent_channels, self.config.grid
        if z is None or z.dim() != 4 or tuple(z.shape[1:]) != (c, g, g):
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"the 'vae' tokenizer decodes latents of shape (N, {c}, {g}, {g}), got {got}")
        z = z.to(self.decoder.conv_in.weight.dtype) / self.config.latent_scale + self.config.latent_shift
        return self.decoder(z)

    def loss(self, images: Tensor, step: int = 0) -> dict[str, Tensor]:
        mean, logvar = self.posterior(images)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)  # reparameterized sample
        rec = reconstruction_loss(self.decoder(z), images)
        kl_sum = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)  # (N,)
        kl = kl_sum.mean() / images[0].numel()
        return {"loss": rec + self.kl_weight * kl, "rec": rec.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def calibrate(self, images: Tensor, batch_size: int = 256) -> None:
        """Set latent_shift / latent_scale so that encoded latents have mean 0 and std 1 on `images`."""
        means = torch.cat([self.posterior(images[i : i + batch_size])[0].float()
                           for i in range(0, len(images), batch_size)])
        self.config.latent_shift = float(means.mean())
        self.config.latent_scale = float(1.0 / means.std().clamp_min(1e-8))
