"""The contract between the backbone and an image interface, and token-layout helpers.

An interface turns `ImageTokens` (from the image tokenizer) into embeddings for the image slots
and back. During training the model hands it, per image, the hidden states at the slots
(N, L, D) and at the positions that predict each slot, i.e. `<boi>` and slots 0..L−2 (N, L, D):

    inputs, ctx = interface.train_inputs(tokens, conditions, generator)   # (N, L, D), anything
    per_image   = interface.loss(ctx, slots, prev, generator)             # (N,), already weighted

At generation, a bidirectional interface ("diffusion") is denoised by the engine through
`embed_noisy` / `predict`; a causal one draws token by token:

    step = interface.sample_token(prev, prev_uncond, k, opts, generators, text_logits)
    x    = interface.embed_token(step)          # (R, 1, D), fed back to the backbone
    tokens = interface.assemble(steps)          # ImageTokens (R, g, g)

Layout: tokens are read in raster order. Codes (N, g, g) <-> (N, L); latents (N, c, G, G) <->
patches (N, L, c·p·p) with G = g·p.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from mmgen.config import ModelConfig


class ImageInterface(nn.Module):
    causal: bool = True  # image slots are predicted one after another (causal attention inside images)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.cfg = config.image
        self.hidden_size = config.backbone.hidden_size

    def init_weights(self) -> None:
        """Called after the model's normal(0, 0.02) initialization of every Linear and Embedding."""
        head = getattr(self, "head", None)
        if head is not None:
            head.reset_parameters()  # the MLP head keeps its own (adaLN-Zero) initialization

    def patchify(self, latents: Tensor) -> Tensor:
        """(N, c, G, G) -> (N, L, c·p·p)."""
        p = self.cfg.patch_size
        return rearrange(latents, "n c (h p) (w q) -> n (h w) (c p q)", p=p, q=p)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(N, L, c·p·p) -> (N, c, G, G)."""
        p, g = self.cfg.patch_size, self.cfg.grid
        return rearrange(patches, "n (h w) (c p q) -> n c (h p) (w q)", h=g, w=g, p=p, q=p)

    @staticmethod
    def flatten_codes(codes: Tensor) -> Tensor:
        """(N, g, g) -> (N, L)."""
        return codes.flatten(1)

    def unflatten_codes(self, codes: Tensor) -> Tensor:
        """(N, L) -> (N, g, g)."""
        return codes.view(len(codes), self.cfg.grid, self.cfg.grid)
