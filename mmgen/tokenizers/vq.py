"""VQ tokenizer (Chameleon-style): conv encoder -> nearest codebook entry per cell -> conv decoder.

Training (VQ-VAE): reconstruction + ‖sg[z] − e‖² (codebook) + β‖z − sg[e]‖² (commitment, β = 0.25),
with the straight-through estimator carrying the decoder's gradient to the encoder.
Against codebook collapse, dead codes are restarted from recent encoder outputs (see `Quantizer`).
Shapes: N images, C channels, R pixels per side, g = R / downsample cells, c latent channels, K codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.config import ImageTokenizerConfig
from mmgen.metrics import code_statistics
from mmgen.tokenizers.image import ImageTokenizer, ImageTokens
from mmgen.tokenizers.nets import Decoder, Encoder


def reconstruction_loss(recon: Tensor, images: Tensor) -> Tensor:
    """L1 + L2 per pixel (no perceptual network: nothing is downloaded)."""
    diff = recon.float() - images.float()
    return diff.abs().mean() + diff.pow(2).mean()


class Quantizer(nn.Module):
    """A codebook of K vectors of dimension c, nearest-neighbour (L2) lookup, dead-code restarts.

    Why restarts rather than l2-normalized or factorized lookup: our latents are already low
    dimensional (c = 4), where projecting to the unit sphere throws away a quarter of the degrees
    of freedom (the norm), and the classic failure - codes initialized away from the encoder's
    outputs never win a lookup, so they never move - is cured directly by moving every code
    unused for `dead_after` training steps onto a random encoder output of the current batch
    (plus a little noise), as in Jukebox / SoundStream. Usage is tracked in non-persistent
    buffers (not saved), so checkpoints hold only the codebook.
    """

    def __init__(self, codebook_size: int, dim: int, dead_after: int = 20, restart_every: int = 10):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))  # (K, c)
        self.dead_after, self.restart_every = dead_after, restart_every
        self.register_buffer("last_used", torch.full((codebook_size,), -1, dtype=torch.long), persistent=False)

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    def lookup(self, z: Tensor) -> Tensor:
        """Latents (N, c, g, g) -> codes (N, g, g) int64: the nearest codebook entry of each cell."""
        n, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()  # (N·g·g, c)
        book = self.codebook.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.T + book.pow(2).sum(1)  # (N·g·g, K)
        return dist.argmin(1).view(n, h, w)  # (N, g, g)

    def dequantize(self, codes: Tensor) -> Tensor:
        """Codes (N, g, g) -> codebook vectors (N, c, g, g)."""
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be int64 (or int32) codebook ids, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.size):
            raise ValueError(f"codes must lie in [0, {self.size}), got ids from {int(codes.min())} to {int(codes.max())}")
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)  # (N, g, g, c) -> (N, c, g, g)

    def forward(self, z: Tensor, step: int | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Quantize with the straight-through estimator.

        Returns (z_q (N, c, g, g) whose gradient flows to z, codes (N, g, g), losses and statistics).
        When `step` is given and the module is training, usage is tracked and dead codes restarted.
        """
        codes = self.lookup(z.detach())
        q = self.dequantize(codes)
        stats = {
            "codebook": F.mse_loss(q, z.detach()),  # moves the codes towards the encoder outputs
            "commit": F.mse_loss(z, q.detach()),  # keeps the encoder near its codes
        }
        stats["usage"], stats["perplexity"] = code_statistics(codes, self.size)
        if step is not None and self.training:
            stats["restarted"] = torch.tensor(float(self.restart_dead(z.detach(), codes, step)))
        return z + (q - z).detach(), codes, stats

    @torch.no_grad()
    def restart_dead(self, z: Tensor, codes: Tensor, step: int) -> int:
        """Mark the codes used in this batch; every `restart_every` steps move each code unused for
        `dead_after` steps onto a random latent vector of this batch. Returns how many moved."""
        if (self.last_used < 0).all():  # first call (also after loading): count from here
            self.last_used.fill_(step)
        self.last_used[codes.unique()] = step
        if step % self.restart_every:
            return 0
        dead = (step - self.last_used >= self.dead_after).nonzero().flatten()
        if len(dead) == 0:
            return 0
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N·g·g, c)
        pick = torch.randint(len(flat), (len(dead),), device=flat.device)
        noise = 0.01 * flat.std(0, keepdim=True) * torch.randn_like(flat[pick])
        self.codebook.data[dead] = (flat[pick] + noise).to(self.codebook.dtype)
        self.last_used[dead] = step
        return len(dead)


class VQTokenizer(ImageTokenizer):
    """kind "vq": encode -> ImageTokens(codes (N, g, g) int64); decode(codes) -> images (N, C, R, R)."""

    beta = 0.25  # commitment weight (VQ-VAE)

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__(config)
        c = config
        if c.codebook_size < 2:
            raise ValueError(f"a {c.kind!r} tokenizer needs codebook_size >= 2, got {c.codebook_size}")
        self.encoder = Encoder(c.channels, c.width, c.res_blocks, c.downsample, c.latent_channels)
        self.quantizer = Quantizer(c.codebook_size, c.latent_channels)
        self.decoder = Decoder(c.channels, c.width, c.res_blocks, c.downsample, c.latent_channels)

    def _dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def latent(self, images: Tensor) -> Tensor:
        """The continuous encoder output z (N, c, g, g), before quantization."""
        self.check_images(images)
        return self.encoder(images.to(self._dtype()))

    def features(self, images: Tensor) -> Tensor:
        """The encoder output z (N, c, g, g) before quantization (also hybrid's dequantize(codes) + residual)."""
        return self.latent(images)

    def dequantize(self, codes: Tensor) -> Tensor:
        """Codes (N, g, g) -> codebook vectors (N, c, g, g)."""
        g = self.config.grid
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (g, g):
            raise ValueError(f"codes must have shape (N, {g}, {g}), got {tuple(codes.shape)}")
        return self.quantizer.dequantize(codes)

    def encode(self, images: Tensor) -> ImageTokens:
        return ImageTokens(codes=self.quantizer.lookup(self.latent(images)))

    def decode(self, tokens: ImageTokens) -> Tensor:
        if tokens.codes is None:
            raise ValueError(f"the {self.config.kind!r} tokenizer decodes codes; ImageTokens.codes is None")
        return self.decoder(self.dequantize(tokens.codes))

    def loss(self, images: Tensor, step: int = 0) -> dict[str, Tensor]:
        z = self.latent(images)  # (N, c, g, g)
        z_q, _, parts = self.quantizer(z, step)
        rec = reconstruction_loss(self.decoder(z_q), images)
        loss = rec + parts["codebook"] + self.beta * parts["commit"]
        return {"loss": loss, "rec": rec.detach(), **{k: v.detach() for k, v in parts.items()}}

    @torch.no_grad()
    def calibrate(self, images: Tensor) -> None:
        """Nothing to calibrate: codes carry no continuous scale."""
