"""The unified model: token embeddings + continuous image head + LLaMA backbone + LM head; losses.

Top-level parameter names are Hugging Face's (`model.layers.*`, `lm_head.weight`), so an HF Llama
checkpoint fills the backbone directly; the image head lives under `image.*`.

Shapes: B batch, T tokens, D hidden, N images in the batch, L tokens per image, P patch dim, V vocab.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.backbone import KVCache, LlamaModel
from mmgen.config import ModelConfig
from mmgen.diffusion.objective import Objective
from mmgen.diffusion.step_cache import FirstBlockCache
from mmgen.heads.patch import PatchHead
from mmgen.sequence import IGNORE, SequenceBatch, attention_mask


class MMGenModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        bb = config.backbone
        self.model = LlamaModel(bb)
        self.lm_head = nn.Linear(bb.hidden_size, bb.vocab_size, bias=False)
        self.image = PatchHead(config.image, bb.hidden_size)
        self.objective = Objective(config.diffusion.objective)
        self.apply(self._init_weights)
        nn.init.zeros_(self.image.proj_out.weight)  # start by predicting zeros (DiT-style)
        nn.init.zeros_(self.image.proj_out.bias)
        if bb.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.backbone.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # -- forward ---------------------------------------------------------------------------------

    def embed(self, ids: Tensor, image_id: Tensor, image_tokens: Tensor | None) -> Tensor:
        """Token embeddings (B, T, D), with slots where image_id >= 0 filled from image_tokens (N, L, D)
        in reading order."""
        x = self.model.embed_tokens(ids)
        slots = image_id >= 0
        if image_tokens is None or image_tokens.numel() == 0:
            if slots.any():
                raise ValueError("the sequence has image slots but no image tokens were given")
            return x
        if slots.sum().item() != image_tokens.shape[0] * image_tokens.shape[1]:
            raise ValueError(
                f"{slots.sum().item()} image slots but {image_tokens.shape[0]}×{image_tokens.shape[1]} image tokens"
            )
        return x.masked_scatter(slots[..., None], image_tokens.to(x.dtype))

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        doc_id: Tensor,
        image_id: Tensor,
        cache: KVCache | None = None,
        step_cache: FirstBlockCache | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Backbone over embeddings x (B, T, D); cached keys (if any) come first.

        Returns hidden states (B, T, D) and per-layer keys/values over cache + chunk.
        """
        max_pos = self.config.backbone.max_position_embeddings
        real = positions[doc_id >= 0]
        if real.numel() and real.max().item() >= max_pos:
            raise ValueError(
                f"sequence reaches position {real.max().item()}, over the model's maximum of {max_pos} tokens"
            )
        if cache is not None and cache.length:
            k_doc = torch.cat([cache.doc_id, doc_id], 1)
            k_img = torch.cat([cache.image_id, image_id], 1)
            mask = attention_mask(doc_id, image_id, k_doc, k_img, offset=cache.length)
        else:
            mask = attention_mask(doc_id, image_id, doc_id, image_id)
        return self.model(x, positions, mask, cache if cache is not None and cache.length else None, step_cache)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    # -- training --------------------------------------------------------------------------------

    def loss(self, batch: SequenceBatch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """L = L_LM + λ·L_image on one batch (DESIGN §4).

        Returns differentiable sums and their counts, so a data-parallel trainer can normalize by
        global counts (total = lm_sum / Σtokens + image_sum / Σimages), and the local means:
            loss:      lm_sum / tokens + image_sum / images (differentiable)
            lm_sum:    Σ over labelled tokens of cross-entropy (+ z_loss · z²)
            image_sum: Σ over images of λ · that image's loss
            tokens, images: the counts (int64 scalars)
            lm, image, z: detached means, for logging
        """
        cfg = self.config.diffusion
        images = batch.images.to(self.dtype)
        n = images.shape[0]
        if n:
            t = torch.rand(n, generator=generator, device=images.device)
            t = torch.where(batch.image_conditions, t * cfg.max_t_when_conditioning, t)
            noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            x_t, target = self.objective.add_noise(images, t, noise)
            tokens = self.image.embed(self.image.patchify(x_t), t)  # (N, L, D)
        else:
            tokens = None
        x = self.embed(batch.ids, batch.image_id, tokens)
        hidden, _ = self(x, batch.positions, batch.doc_id, batch.image_id)

        labelled = batch.labels != IGNORE
        logits = self.logits(hidden[labelled]).float()  # (M, V)
        ce = F.cross_entropy(logits, batch.labels[labelled], reduction="none")  # (M,)
        z = logits.logsumexp(-1).pow(2)  # (M,)
        lm_sum = (ce + cfg.z_loss * z).sum()
        if n:
            l = self.config.image.tokens_per_image
            pred = self.image.predict(hidden[batch.image_id >= 0].view(n, l, -1))  # (N, L, P)
            per_image = (pred.float() - self.image.patchify(target).float()).pow(2).mean((1, 2))  # (N,)
        else:
            per_image = hidden.new_zeros(0)
        image_sum = cfg.loss_weight * per_image.sum()
        tokens_n, images_n = labelled.sum(), torch.tensor(n, device=hidden.device)
        total = lm_sum / tokens_n.clamp(min=1) + image_sum / images_n.clamp(min=1)
        return {
            "loss": total, "lm_sum": lm_sum, "image_sum": image_sum, "tokens": tokens_n, "images": images_n,
            "lm": (ce.sum() / tokens_n.clamp(min=1)).detach(),
            "image": (per_image.sum() / images_n.clamp(min=1)).detach(),
            "z": (z.sum() / tokens_n.clamp(min=1)).detach(),
        }

    # -- persistence (see mmgen.checkpoint) ------------------------------------------------------

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        from mmgen.checkpoint import save_pretrained

        save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> MMGenModel:
        from mmgen.checkpoint import load_pretrained

        return load_pretrained(directory, device)
