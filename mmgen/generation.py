"""Decode loop over ids and images: text with a KV cache; images drawn by the image interface.

The engine knows nothing about strings: prompts are segments of token ids (list[int]) and image
tensors. It samples text, and when a row emits <boi> (or the caller forces one) it hands the
drawing rows to the model's image interface (`ImageInterface.draw`), whatever the interface is.
A final clean pass writes the finished image into the cache, <eoi> follows and text continues.

`Engine.stream` is a generator of `mmgen.events`; `Engine.generate` collects it. Leaving the
iterator early stops the work at the next event.

Shapes: B rows, R rows drawing an image, L tokens per image, C/H/W image, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmgen.backbone import KVCache
from mmgen.errors import InputError, OptionError, check_number
from mmgen.events import Done, Event, ImageDone, ImageStart, ImageStep, Token, relay
from mmgen.interfaces.base import DrawRequest
from mmgen.model import MMGenModel
from mmgen.sampling import MAX_SEED, GenerationOptions, sample_token
from mmgen.sequence import SequenceBuilder

__all__ = ["Engine", "GenerationOptions"]

Prompt = Sequence["list[int] | Tensor"]


@dataclass
class _Rows:
    """The state of one generation call: per row its cache, last hidden state and outputs."""

    cache: KVCache
    last: Tensor  # (B, D) hidden state of each row's newest token
    seeds: list[int]
    generators: list[torch.Generator]
    forced: Tensor  # (B,) a token to emit next instead of sampling (-1: none)
    done: Tensor  # (B,) bool
    n_images: Tensor  # (B,) images drawn so far
    outputs: list[list] = field(default_factory=list)


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
        self.step_cache = None  # First Block Cache statistics of the last image drawn with one
        self.banned = [self.tok.pad_id, self.tok.bos_id, self.tok.eoi_id, getattr(self.tok, "unk_id", self.tok.pad_id)]
        self.image_room = model.config.image.tokens_per_image + 2  # <boi> image <eoi>

    def null_prefix(self) -> tuple[KVCache, Tensor]:
        """`<bos> <boi>` prefilled: the unconditional branch of guidance; its cache and hidden state (1, D)."""
        return self.model.prefill(self.builder([[[self.tok.boi_id]]], add_eos=False))

    def generate(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None,
                 seed: int | Sequence[int] = 0, force_image: bool | Sequence[bool] = False,
                 stop: Sequence[int] = ()) -> list[list[list[int] | Tensor]]:
        """`stream` to the end; returns per row the generated segments: token-id lists (without
        special ids) and images (C, H, W) in [-1, 1]."""
        for event in self.stream(prompts, options, seed, force_image, stop):
            if isinstance(event, Done):
                return event.outputs
        raise AssertionError("stream ended without Done")

    @torch.no_grad()
    def stream(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None,
               seed: int | Sequence[int] = 0, force_image: bool | Sequence[bool] = False,
               stop: Sequence[int] = ()) -> Iterator[Event]:
        """Continue each prompt until <eos> (or a `stop` id), `max_new_tokens` or the context limit.

        Args:
            prompts: per row, segments of token ids (list[int]) and images (C, H, W) in [-1, 1].
            options: sampling settings; image options the model's interface does not take are an error.
            seed: one per row (or a base seed: row i uses seed + i); a row's output depends only
                on its prompt and its seed, not on the rest of the batch.
            force_image: start the answer with <boi> (for every row, or per row).
            stop: more ids that end a row like <eos> (e.g. <|end|> for a chat turn); not returned.

        Yields:
            `mmgen.events`: Token, ImageStart, ImageStep, ImageDone as they happen, then Done.
        """
        opts = options or GenerationOptions()
        image_opts = self.model.image.options(opts)  # checked before any work
        rows = self._start(prompts, opts, seed, force_image)
        ends = torch.tensor(sorted({self.tok.eos_id, *stop}), device=self.model.device)
        max_pos = self.model.config.backbone.max_position_embeddings
        for _ in range(opts.max_new_tokens):
            rows.done |= rows.cache.next_position >= max_pos  # out of context: the row stops
            if rows.done.all():
                break
            nxt, active = self._next_tokens(rows, opts)
            ended = torch.isin(nxt, ends)
            for i in active.nonzero().flatten().tolist():
                if int(nxt[i]) not in (self.tok.boi_id, self.tok.eoi_id) and not ended[i]:
                    _append_token(rows.outputs[i], int(nxt[i]))
                    yield Token(i, int(nxt[i]))
            rows.done |= active & ended
            drawing = active & (nxt == self.tok.boi_id)
            if drawing.any():
                yield from self._draw(rows, drawing, image_opts)
            if rows.done.all():
                break
        yield Done(rows.outputs)

    def _start(self, prompts: Sequence[Prompt], opts: GenerationOptions, seed: int | Sequence[int],
               force_image: bool | Sequence[bool]) -> _Rows:
        """Validate the call, prefill the prompts and set up each row's state."""
        m, b = self.model, len(prompts)
        if not b:
            raise InputError("no prompts: give at least one")
        seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
        if len(seeds) != b:
            raise OptionError(f"{len(seeds)} seeds for {b} prompts: give one seed, or one per prompt")
        for i, s in enumerate(seeds):
            check_number(f"seed of row {i}" if b > 1 else "seed", s, low=0, high=MAX_SEED, integer=True)
        force = [force_image] * b if isinstance(force_image, bool) else list(force_image)
        if len(force) != b:
            raise ValueError(f"{len(force)} force_image flags for {b} prompts")
        if any(force) and opts.max_images < 1:
            raise ValueError("force_image needs max_images >= 1")
        cache, last = m.prefill(self.builder(prompts, add_eos=False))
        max_pos = m.config.backbone.max_position_embeddings
        for i, f in enumerate(force):
            if f and int(cache.next_position[i]) + self.image_room > max_pos:
                raise ValueError(
                    f"prompt {i} is {int(cache.next_position[i])} tokens long: an image needs {self.image_room} "
                    f"more positions and the model holds {max_pos}; shorten the prompt"
                )
        dev = m.device
        return _Rows(
            cache, last, seeds, [torch.Generator(device=dev).manual_seed(s) for s in seeds],
            forced=torch.tensor([self.tok.boi_id if f else -1 for f in force], device=dev),
            done=torch.zeros(b, dtype=torch.bool, device=dev), n_images=torch.zeros(b, dtype=torch.long, device=dev),
            outputs=[[] for _ in range(b)],
        )

    def _next_tokens(self, rows: _Rows, opts: GenerationOptions) -> tuple[Tensor, Tensor]:
        """Sample (or take the forced) next token of every row (B,), feed it to the cache for the
        active rows; returns the tokens and the active-row mask (B,)."""
        m = self.model
        logits = m.logits(rows.last).float()  # (B, V)
        logits[:, self.banned] = float("-inf")
        max_pos = m.config.backbone.max_position_embeddings
        no_image = (rows.n_images >= opts.max_images) | (rows.cache.next_position + self.image_room > max_pos)
        logits[no_image, self.tok.boi_id] = float("-inf")
        sampled = sample_token(logits, rows.generators, opts.temperature, opts.top_k, opts.top_p, opts.min_p)
        nxt = torch.where(rows.forced >= 0, rows.forced, sampled)
        rows.forced.fill_(-1)
        active = ~rows.done
        x = m.embed(nxt[:, None], nxt.new_full((len(nxt), 1), -1), None)  # (B, 1, D)
        rows.last = m.extend(rows.cache, x, active, False)[:, -1]
        return nxt, active

    def _draw(self, rows: _Rows, drawing: Tensor, image_opts) -> Iterator[Event]:
        """Draw one image for each row in `drawing` (B,) bool through the interface, commit it to the
        cache (the clean pass), and force <eoi> next."""
        m = self.model
        idx = drawing.nonzero().flatten()
        which = idx.tolist()
        yield ImageStart(which)
        request = DrawRequest(
            m, rows.cache.select(idx), rows.last[idx], self.null_prefix, image_opts,
            [rows.generators[i] for i in which],
            [rows.seeds[i] * 1_000_003 + int(rows.n_images[i]) for i in which],  # one noise path per row and image
        )
        tokens = yield from relay(m.image.draw(request), lambda e: ImageStep([which[i] for i in e.rows], e.step,
                                                                            e.steps, e.denoised))
        self.step_cache = request.step_cache
        embedded = m.image.embed(tokens)  # (R, L, D)
        full = embedded.new_zeros(len(drawing), *embedded.shape[1:])  # rows not drawing get masked slots
        full[idx] = embedded
        m.extend(rows.cache, full, drawing, True)  # the clean pass
        for i, image in zip(which, m.decode_images(tokens)):
            rows.outputs[i].append(image)
            yield ImageDone(i, image)
        rows.n_images += drawing.long()
        rows.forced = torch.where(drawing, self.tok.eoi_id, rows.forced)


def _append_token(segments: list, token: int) -> None:
    if not segments or not isinstance(segments[-1], list):
        segments.append([])
    segments[-1].append(token)
