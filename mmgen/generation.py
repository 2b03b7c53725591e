"""Decode loop over ids and images: text with a KV cache, images drawn on a cached prefix.

The engine knows nothing about strings: prompts are segments of token ids (list[int]) and image
tensors. On <boi> (sampled, or forced by the caller) the image interface decides how it is drawn:
  bidirectional ("diffusion"): denoised with the prefix's keys and values computed once; each step
      runs only the image tokens, conditional and null-prompt branches in one batch for CFG;
  causal ("discrete", "hybrid", "mar"): token by token, the null prompt extended beside every row
      for CFG; codes are chosen from the joint [text | codes] logits under `ImageGrammar`.
A final clean pass writes the finished image into the cache, then <eoi> follows and text continues.

Shapes: B rows, R rows generating an image, L tokens per image, C/H/W image, V vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from mmgen.backbone import KVCache, pad_and_stack
from mmgen.diffusion.guidance import Guidance
from mmgen.diffusion.noise import BrownianTreeNoise, iid_noise
from mmgen.diffusion.samplers import SAMPLERS, STOCHASTIC
from mmgen.diffusion.schedules import make_sigmas, resolution_shift
from mmgen.diffusion.step_cache import FirstBlockCache
from mmgen.grammar import ImageGrammar
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBatch, SequenceBuilder
from mmgen.tokenizers.image import ImageTokens

Prompt = Sequence["list[int] | Tensor"]


@dataclass
class GenerationOptions:
    """Sampling settings.

    Text: temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off.
    Images: `sampler` (see SAMPLERS) walks `schedule` ("uniform" in the model's time, "karras", or
    a list of σs) in `image_steps` steps (None: 25 in the backbone, the MLP head's `steps` per
    token); `shift` is the flow shift of "uniform"; `eta` the noise of the stochastic samplers
    (None: the sampler's default), drawn from a per-row Brownian tree or i.i.d. (`noise`);
    `guidance` a CFG scale or a full `Guidance` (for codes: CFG on logits with its scale);
    `cache_threshold` τ of First Block Cache (0 = off). Causal interfaces sample codes with
    `image_temperature` and `image_top_k`, and scale the MLP head's starting noise by
    `image_temperature` (MAR uses 0.95 without CFG).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    image_steps: int | None = None
    image_temperature: float = 1.0
    image_top_k: int = 0
    sampler: str = "euler"
    schedule: str | Sequence[float] = "uniform"
    shift: float | str = 1.0  # "auto": from the number of image tokens (SD3 / Flux dynamic shifting)
    eta: float | None = None
    noise: str = "brownian"
    guidance: float | Guidance = 3.0
    cache_threshold: float = 0.0
    max_images: int = 1  # images per row before <boi> is no longer allowed

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling options: {self}")
        if self.image_temperature < 0 or self.image_top_k < 0 or (self.image_steps is not None and self.image_steps < 1):
            raise ValueError(f"invalid image sampling options: {self}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {sorted(SAMPLERS)}")
        if isinstance(self.shift, str) and self.shift != "auto":
            raise ValueError(f"shift must be a number or 'auto', got {self.shift!r}")
        if self.noise not in ("brownian", "iid"):
            raise ValueError(f"noise must be 'brownian' or 'iid', got {self.noise!r}")
        if not isinstance(self.guidance, Guidance):
            self.guidance = Guidance(scale=float(self.guidance))


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
        self.step_cache: FirstBlockCache | None = None  # statistics of the last image run
        self.banned = [self.tok.pad_id, self.tok.bos_id, self.tok.eoi_id, getattr(self.tok, "unk_id", self.tok.pad_id)]
        cfg = model.config
        self.grammar = (
            ImageGrammar(cfg.backbone.vocab_size, cfg.image.tokenizer.codebook_size, cfg.image.tokens_per_image,
                         self.tok.boi_id, self.tok.eoi_id)
            if cfg.image.tokenizer.discrete else None
        )
        if self.grammar is not None:  # the grammar owns <eoi>: the only legal token once an image is complete
            self.banned.remove(self.tok.eoi_id)

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits (B, V), or (B, V + K) over [text | codes] when images are codes."""
        logits = self.model.logits(hidden).float()
        return torch.cat([logits, self.model.image.code_logits(hidden).float()], -1) if self.grammar else logits

    # -- cache primitives --------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, batch: SequenceBatch) -> tuple[KVCache, Tensor]:
        """Run prompts (images in them clean) into a fresh cache; returns it and each row's last hidden (B, D)."""
        m = self.model
        batch = batch.to(m.device)
        tokens = m.image.embed(m.encode_images(batch.images)) if batch.images.shape[0] else None
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
        positions = torch.where(doc >= 0, positions, 0)  # masked slots of finished rows take no position
        hidden, kv = self.model(x, positions, doc, image_id, cache)
        cache.keys, cache.values = [k for k, _ in kv], [v for _, v in kv]
        cache.doc_id = torch.cat([cache.doc_id, doc], 1)
        cache.image_id = torch.cat([cache.image_id, image_id], 1)
        cache.next_position = cache.next_position + active.long() * t
        return hidden

    def null_prompt(self) -> SequenceBatch:
        """`<bos> <boi>`: the unconditional branch of classifier-free guidance."""
        return self.builder([[[self.tok.boi_id]]], add_eos=False)

    def image_denoiser(
        self, cache: KVCache, guidance: Guidance, step_cache: FirstBlockCache | None = None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """D(x, σ) for the rows of `cache` (each ending in <boi>); the cache is read, never written.

        Guided steps run the null prompt `<bos> <boi>` beside every row in the same batch;
        unguided ones (scale 1, or σ outside the guidance interval) run the rows alone.
        """
        m, r = self.model, cache.doc_id.shape[0]
        both = pad_and_stack([cache] + [self.prefill(self.null_prompt())[0]] * r) if guidance.scale != 1 else None
        L = self.model.config.image.tokens_per_image
        image_id = int(cache.image_id.max()) + 1
        obj = m.objective

        def branches(x: Tensor, sigma: Tensor, with_uncond: bool) -> tuple[Tensor, Tensor | None]:
            kv = both if with_uncond else cache
            rows = kv.doc_id.shape[0]
            t = obj.t_from_sigma(sigma.double()).float().expand(rows)
            a, _ = obj.alpha_sigma(t)
            x_t = (torch.cat([x, x]) if with_uncond else x) * a.view(-1, 1, 1, 1).to(x.dtype)
            tokens = m.image.embed_patches(m.image.patchify(x_t.to(m.dtype)), t)  # (rows, L, D)
            positions = kv.next_position[:, None] + torch.arange(L, device=m.device)  # (rows, L)
            doc = torch.zeros(rows, L, dtype=torch.long, device=m.device)
            ids = torch.full((rows, L), image_id, device=m.device)
            hidden, _ = m(tokens, positions, doc, ids, kv, step_cache)
            x0 = obj.to_x0(x_t, m.image.unpatchify(m.image.predict(hidden)).to(x.dtype), t)
            return (x0[:r], x0[r:]) if with_uncond else (x0, None)

        return torch.no_grad()(guidance.denoiser(branches))

    # -- the loop ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        options: GenerationOptions | None = None,
        seed: int | Sequence[int] = 0,
        force_image: bool | Sequence[bool] = False,
        progress: Callable[[dict], None] | None = None,
        stop: Sequence[int] = (),
        on_event: Callable[[dict], None] | None = None,
    ) -> list[list[list[int] | Tensor]]:
        """Continue each prompt until <eos> (or a `stop` id) or `max_new_tokens`.

        Args:
            prompts: per row, segments of token ids (list[int]) and images (C, H, W) in [-1, 1].
            options: sampling settings.
            seed: one per row (or a base seed: row i uses seed + i); a row's output depends only
                on its prompt and its seed, not on the rest of the batch.
            force_image: start the answer with <boi> (for every row, or per row).
            progress: called after every denoising step with {"i", "steps", ...}.
            stop: more ids that end a row like <eos> (e.g. <|end|> for a chat turn); not returned.
            on_event: called as generation goes, for streaming: {"type": "token", "row", "id"} for each
                text token kept, {"type": "image_start", "rows"} and {"type": "image_done", "row",
                "image"} (C, H, W) around each image, {"type": "image_step", "rows", "i", "steps",
                "denoised"} after each denoising step (or token, for causal interfaces).

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
        max_pos = m.config.backbone.max_position_embeddings
        image_room = m.config.image.tokens_per_image + 2  # <boi> image <eoi>
        if any(force) and opts.max_images < 1:
            raise ValueError("force_image needs max_images >= 1")
        for i, f in enumerate(force):
            if f and int(cache.next_position[i]) + image_room > max_pos:
                raise ValueError(
                    f"prompt {i} is {int(cache.next_position[i])} tokens long: an image needs {image_room} more "
                    f"positions and the model holds {max_pos}; shorten the prompt"
                )
        forced = torch.tensor([tok.boi_id if f else -1 for f in force], device=dev)
        ends = torch.tensor(sorted({tok.eos_id, *stop}), device=dev)
        drawing_rows: list[int] = []  # the rows drawing an image now
        if on_event is not None:
            user_progress = progress

            def progress(info: dict) -> None:  # the caller's progress, plus an image_step event
                on_event({"type": "image_step", "rows": list(drawing_rows), **info})
                if user_progress is not None:
                    user_progress(info)
        n_images = torch.zeros(b, dtype=torch.long, device=dev)
        state = torch.full((b,), -1, dtype=torch.long, device=dev)  # grammar state: -1 = text
        outputs: list[list] = [[] for _ in range(b)]
        for _ in range(opts.max_new_tokens):
            done |= cache.next_position >= max_pos  # out of context: the row stops
            if done.all():
                break
            logits = self.logits(last)
            logits[:, self.banned] = float("-inf")
            no_image = (n_images >= opts.max_images) | (cache.next_position + image_room > max_pos)
            logits[no_image, tok.boi_id] = float("-inf")
            if self.grammar is not None:
                logits = self.grammar.constrain(logits, state)  # no codes outside images
            nxt = torch.where(forced >= 0, forced, sample_token(logits, opts, gens))
            forced.fill_(-1)
            active = ~done
            if self.grammar is not None:
                state[active] = self.grammar.advance(state[active], nxt[active])
            last = self.extend(cache, m.embed(nxt[:, None], nxt.new_full((b, 1), -1), None), active, False)[:, -1]
            ended = torch.isin(nxt, ends)
            for i in active.nonzero().flatten().tolist():
                if nxt[i] not in (tok.boi_id, tok.eoi_id) and not ended[i]:
                    if not outputs[i] or not isinstance(outputs[i][-1], list):
                        outputs[i].append([])
                    outputs[i][-1].append(int(nxt[i]))
                    if on_event is not None:
                        on_event({"type": "token", "row": i, "id": int(nxt[i])})
            done |= active & ended
            drawing = active & (nxt == tok.boi_id)
            if drawing.any():
                drawing_rows[:] = drawing.nonzero().flatten().tolist()
                if on_event is not None:
                    on_event({"type": "image_start", "rows": list(drawing_rows)})
                images = self._draw(cache, last, drawing, opts, gens, seeds, n_images, progress)
                for i, img in zip(drawing_rows, images):
                    outputs[i].append(img)
                    if on_event is not None:
                        on_event({"type": "image_done", "row": i, "image": img})
                n_images += drawing.long()
                if self.grammar is not None:
                    state = torch.where(drawing, self.grammar.length, state)  # all codes emitted: <eoi> next
                forced = torch.where(drawing, tok.eoi_id, forced)
            if done.all():
                break
        return outputs

    def _draw(self, cache, last, rows, opts, gens, seeds, n_images, progress) -> Tensor:
        """Draw one image for each row in `rows` (B,) bool, commit it to the cache, return its pixels (R, C, H, W)."""
        m = self.model
        idx = rows.nonzero().flatten()
        if m.config.image.causal:
            tokens = self._draw_tokens(cache.select(idx), last[idx], opts, [gens[i] for i in idx.tolist()], progress)
        else:
            latents = self._denoise(cache.select(idx), opts, gens, seeds, n_images, idx.tolist(), progress)
            # commit the image as the model sees a prompt image: decoded to pixels, encoded again
            tokens = m.encode_images(m.decode_images(ImageTokens(latents=latents)))
        embedded = m.image.embed(tokens)  # (R, L, D)
        full = embedded.new_zeros(len(rows), *embedded.shape[1:])  # rows not drawing get masked slots
        full[idx] = embedded
        self.extend(cache, full, rows, True)  # the clean pass
        return m.decode_images(tokens)

    def _denoise(self, cache, opts, gens, seeds, n_images, idx, progress) -> Tensor:
        """Bidirectional interfaces: sample latents (R, c, G, G) with the samplers."""
        m, cfg = self.model, self.model.config.image
        shift = resolution_shift(cfg.tokens_per_image) if opts.shift == "auto" else float(opts.shift)
        sigmas = make_sigmas(m.objective, opts.image_steps or 25, opts.schedule, shift).to(m.device)
        tc = cfg.tokenizer
        shape = (tc.latent_channels, tc.grid, tc.grid)
        x = torch.stack([torch.randn(shape, generator=gens[i], device=m.device) for i in idx]) * sigmas[0].float()
        kwargs = {}
        if opts.sampler in STOCHASTIC:
            if opts.noise == "brownian":  # one path per row, seed and image index: batch-independent
                path_seeds = [seeds[i] * 1_000_003 + int(n_images[i]) for i in idx]
                kwargs["noise"] = BrownianTreeNoise(x, float(sigmas[-2]), float(sigmas[0]), path_seeds)
            else:
                kwargs["noise"] = iid_noise(x, [gens[i] for i in idx])
            if opts.eta is not None:
                kwargs["eta"] = opts.eta
        self.step_cache = FirstBlockCache(opts.cache_threshold) if opts.cache_threshold else None
        denoiser = self.image_denoiser(cache, opts.guidance, self.step_cache)
        return SAMPLERS[opts.sampler](denoiser, x, sigmas, callback=progress, **kwargs)

    def _draw_tokens(self, cache, last, opts, gens, progress) -> ImageTokens:
        """Causal interfaces: L tokens one after another for the R rows of `cache` (each ending in
        <boi>, whose hidden states are `last` (R, D)); the null prompt runs beside them for CFG."""
        m, grammar = self.model, self.grammar
        r, L = len(last), m.config.image.tokens_per_image
        guided = opts.guidance.scale != 1
        kv, h = cache, last
        if guided:
            null_cache, null_last = self.prefill(self.null_prompt())
            kv = pad_and_stack([cache] + [null_cache] * r)
            h = torch.cat([last, null_last.expand(r, -1)])  # (2R, D)
        code_opts = dataclasses.replace(opts, temperature=opts.image_temperature, top_k=opts.image_top_k, top_p=1.0,
                                        min_p=0.0)
        state = torch.zeros(r, dtype=torch.long, device=m.device)  # grammar: <boi> seen, no code yet
        steps = []
        for k in range(L):
            hc, hu = h[:r], (h[r:] if guided else None)
            codes = None
            if grammar is not None:
                logits = self.logits(hc)
                if guided:  # CFG on logits, before the grammar masks them
                    logits_u = self.logits(hu)
                    logits = logits_u + opts.guidance.scale * (logits - logits_u)
                choice = sample_token(grammar.constrain(logits, state), code_opts, gens)
                state = grammar.advance(state, choice)
                codes = choice - grammar.text_vocab
            step = m.image.sample_token(hc, hu, codes, opts, gens)
            steps.append(step)
            if k < L - 1:
                x = m.image.embed_token(step)  # (R, 1, D)
                ones = torch.ones(len(h), dtype=torch.bool, device=m.device)
                h = self.extend(kv, torch.cat([x, x]) if guided else x, ones, True)[:, -1]
            if progress is not None:
                progress({"i": k, "steps": L})
        return m.image.assemble(steps)
