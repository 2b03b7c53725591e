"""Decode loop over ids and images: text with a KV cache, images by denoising on a cached prefix.

The engine knows nothing about strings: prompts are segments of token ids (list[int]) and image
tensors. On <boi> (sampled, or forced by the caller) the image is denoised with the prefix's keys
and values computed once; each step runs only the image tokens, the conditional and null-prompt
branches in one batch for classifier-free guidance. A final clean pass writes the finished image
into the cache, then <eoi> is appended and text continues.

Shapes: B rows, R rows generating an image, L tokens per image, C/H/W image, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from mmgen.backbone import KVCache, pad_and_stack
from mmgen.diffusion.samplers import SAMPLERS
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBatch, SequenceBuilder

Prompt = Sequence["list[int] | Tensor"]


@dataclass
class GenerationOptions:
    """Sampling settings. temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    image_steps: int = 25
    guidance: float = 3.0  # CFG scale w: D = D_u + w·(D_c − D_u); 1 turns guidance off
    sampler: str = "euler"
    max_images: int = 1  # images per row before <boi> is no longer allowed

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling options: {self}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {sorted(SAMPLERS)}")


def sample_token(logits: Tensor, opts: GenerationOptions, generators: Sequence[torch.Generator]) -> Tensor:
    """Pick one token per row from logits (B, V) -> (B,), each row with its own generator."""
    if opts.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / opts.temperature
    if opts.top_k:
        kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if opts.min_p:
        probs = probs.masked_fill(probs < opts.min_p * probs.max(-1, keepdim=True).values, 0)
    if opts.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > opts.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0))
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])


class Engine:
    """Generates continuations for a batch of prompts.

    Args:
        model: the unified model (eval mode is set).
        builder: turns id/image prompts into sequences (carries the special ids).
    """

    def __init__(self, model: MMGenModel, builder: SequenceBuilder):
        self.model = model.eval()
        self.builder = builder
        self.tok = builder.tok
        self.banned = [self.tok.pad_id, self.tok.bos_id, self.tok.eoi_id, getattr(self.tok, "unk_id", self.tok.pad_id)]

    # -- cache primitives --------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, batch: SequenceBatch) -> tuple[KVCache, Tensor]:
        """Run prompts (images in them clean) into a fresh cache; returns it and each row's last hidden (B, D)."""
        m = self.model
        batch = batch.to(m.device)
        n = batch.images.shape[0]
        tokens = m.image.embed(m.image.patchify(batch.images.to(m.dtype)), batch.images.new_zeros(n)) if n else None
        hidden, kv = m(m.embed(batch.ids, batch.image_id, tokens), batch.positions, batch.doc_id, batch.image_id)
        lengths = (batch.doc_id >= 0).sum(1)
        cache = KVCache([k for k, _ in kv], [v for _, v in kv], batch.doc_id, batch.image_id, lengths)
        return cache, hidden[torch.arange(len(lengths)), lengths - 1]

    @torch.no_grad()
    def extend(self, cache: KVCache, x: Tensor, active: Tensor, image: bool) -> Tensor:
        """Append embeddings x (B, T, D) to the cache for the `active` rows (B,) (others get masked
        slots) and return their hidden states (B, T, D). `image` marks the chunk as one image."""
        b, t, _ = x.shape
        doc = torch.where(active, 0, -1)[:, None].expand(b, t)
        image_id = torch.full((b, t), int(cache.image_id.max()) + 1 if image else -1, device=x.device)
        image_id = torch.where(doc >= 0, image_id, -1)
        positions = cache.next_position[:, None] + torch.arange(t, device=x.device)
        hidden, kv = self.model(x, positions, doc, image_id, cache)
        cache.keys, cache.values = [k for k, _ in kv], [v for _, v in kv]
        cache.doc_id = torch.cat([cache.doc_id, doc], 1)
        cache.image_id = torch.cat([cache.image_id, image_id], 1)
        cache.next_position = cache.next_position + active.long() * t
        return hidden

    def null_prompt(self) -> SequenceBatch:
        """`<bos> <boi>`: the unconditional branch of classifier-free guidance."""
        return self.builder([[[self.tok.boi_id]]], add_eos=False)

    def image_denoiser(self, cache: KVCache, guidance: float) -> Callable[[Tensor, Tensor], Tensor]:
        """D(x, σ) for the rows of `cache` (each ending in <boi>); the cache is read, never written.

        With guidance != 1 the null prompt `<bos> <boi>` runs beside every row in the same batch.
        """
        m, r = self.model, cache.doc_id.shape[0]
        guided = guidance != 1.0
        if guided:
            null_cache, _ = self.prefill(self.null_prompt())
            cache = pad_and_stack([cache] + [null_cache] * r)
        rows = cache.doc_id.shape[0]
        L = self.model.config.image.tokens_per_image
        positions = cache.next_position[:, None] + torch.arange(L, device=m.device)  # (rows, L)
        doc = torch.zeros(rows, L, dtype=torch.long, device=m.device)
        image_id = torch.full((rows, L), int(cache.image_id.max()) + 1, device=m.device)

        @torch.no_grad()
        def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
            t = m.objective.t_from_sigma(sigma.double()).float().expand(rows)
            a, _ = m.objective.alpha_sigma(t)
            x_t = torch.cat([x, x]) if guided else x
            x_t = x_t * a.view(-1, 1, 1, 1).to(x.dtype)
            tokens = m.image.embed(m.image.patchify(x_t.to(m.dtype)), t)
            hidden, _ = m(tokens, positions, doc, image_id, cache)
            x0 = m.objective.to_x0(x_t, m.image.unpatchify(m.image.predict(hidden)).to(x.dtype), t)
            if guided:
                cond, uncond = x0.chunk(2)
                return uncond + guidance * (cond - uncond)
            return x0

        return denoiser

    # -- the loop ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        options: GenerationOptions | None = None,
        seed: int | Sequence[int] = 0,
        force_image: bool | Sequence[bool] = False,
        progress: Callable[[dict], None] | None = None,
    ) -> list[list[list[int] | Tensor]]:
        """Continue each prompt until <eos> or `max_new_tokens`.

        Args:
            prompts: per row, segments of token ids (list[int]) and images (C, H, W) in [-1, 1].
            options: sampling settings.
            seed: one per row (or a base seed: row i uses seed + i); a row's output depends only
                on its prompt and its seed, not on the rest of the batch.
            force_image: start the answer with <boi> (for every row, or per row).
            progress: called after every denoising step with {"i", "steps", ...}.

        Returns:
            per row, the generated segments: token-id lists (without special ids) and images (C, H, W).
        """
        opts = options or GenerationOptions()
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        gens = [torch.Generator(device=self.model.device).manual_seed(s) for s in seeds]
        m, tok = self.model, self.tok
        cache, last = self.prefill(self.builder(prompts, add_eos=False))
        b, dev = len(prompts), m.device
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        force = [force_image] * b if isinstance(force_image, bool) else list(force_image)
        forced = torch.tensor([tok.boi_id if f else -1 for f in force], device=dev)
        n_images = torch.zeros(b, dtype=torch.long, device=dev)
        outputs: list[list] = [[] for _ in range(b)]
        max_pos = m.config.backbone.max_position_embeddings
        image_room = m.config.image.tokens_per_image + 2  # <boi> image <eoi>
        for _ in range(opts.max_new_tokens):
            done |= cache.next_position >= max_pos  # out of context: the row stops
            if done.all():
                break
            logits = m.logits(last).float()
            logits[:, self.banned] = float("-inf")
            no_image = (n_images >= opts.max_images) | (cache.next_position + image_room > max_pos)
            logits[no_image, tok.boi_id] = float("-inf")
            nxt = torch.where((forced >= 0) & ~no_image, forced, sample_token(logits, opts, gens))
            nxt = torch.where(forced == tok.eoi_id, forced, nxt)
            forced.fill_(-1)
            active = ~done
            last = self.extend(cache, m.embed(nxt[:, None], nxt.new_full((b, 1), -1), None), active, False)[:, -1]
            for i in active.nonzero().flatten().tolist():
                if nxt[i] not in (tok.boi_id, tok.eoi_id, tok.eos_id):
                    if not outputs[i] or not isinstance(outputs[i][-1], list):
                        outputs[i].append([])
                    outputs[i][-1].append(int(nxt[i]))
            done |= active & (nxt == tok.eos_id)
            drawing = active & (nxt == tok.boi_id)
            if drawing.any():
                images = self._draw(cache, drawing, opts, gens, progress)
                for i, img in zip(drawing.nonzero().flatten().tolist(), images):
                    outputs[i].append(img)
                n_images += drawing.long()
                forced = torch.where(drawing, tok.eoi_id, forced)
            if done.all():
                break
        return outputs

    def _draw(self, cache, rows, opts, gens, progress) -> Tensor:
        """Denoise one image for each row in `rows` (B,) bool, then commit it clean to the cache."""
        m, cfg = self.model, self.model.config.image
        idx = rows.nonzero().flatten()
        sigmas = m.objective.sigmas(opts.image_steps).to(m.device)
        noise = torch.stack([
            torch.randn(cfg.channels, cfg.resolution, cfg.resolution, generator=gens[i], device=m.device)
            for i in idx.tolist()
        ])
        x = noise * sigmas[0].float()
        denoiser = self.image_denoiser(cache.select(idx), opts.guidance)
        images = SAMPLERS[opts.sampler](denoiser, x, sigmas, callback=progress).clamp(-1, 1)  # (R, C, H, W)
        full = torch.zeros(len(rows), cfg.channels, cfg.resolution, cfg.resolution, device=m.device)
        full[idx] = images
        tokens = m.image.embed(m.image.patchify(full.to(m.dtype)), full.new_zeros(len(rows)))  # clean pass
        self.extend(cache, tokens, rows, True)
        return images
