"""Decode loop over ids and images: text with a KV cache; images drawn by the image interface.

The engine knows nothing about strings: prompts are segments of token ids (list[int]) and image
tensors. It samples text, and when a row emits <boi> (or the caller forces one) it hands the
drawing rows to the model's image interface (`ImageInterface.draw`), whatever the interface is.
A final clean pass writes the finished image into the cache, <eoi> follows and text continues.

`Engine.stream` is a generator of `mmgen.events`; `Engine.generate` collects it. Leaving the
iterator early stops the work at the next event. Rows end on their own (<eos>, their token limit,
the context), and a `Feed` can end rows and add new ones between decode steps (continuous
batching, as `mmgen serve` does); ended rows leave the batch, so they cost nothing afterwards.
A decode step reads the device once (the batch's tokens with its positions: streaming needs the
tokens); limits and ends are decided on the host from that. The prefill reserves the cache for the
request (`mmgen.kv_cache`), so the steps keep static shapes and are captured on CUDA (`mmgen.capture`).

Shapes: B rows, R rows drawing an image, L tokens per image, C/H/W image, V vocab.
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mmgen.errors import InputError, OptionError, check_number
from mmgen.events import Done, Event, ImageDone, ImageStart, ImageStep, RowDone, Token, relay
from mmgen.interfaces.base import DrawRequest
from mmgen.kv_cache import KVCache, pad_and_stack
from mmgen.model import MMGenModel
from mmgen.sampling import MAX_SEED, GenerationOptions, sample_token
from mmgen.sequence import SequenceBuilder

__all__ = ["Engine", "Feed", "GenerationOptions", "Join"]

Prompt = Sequence["list[int] | Tensor"]


@dataclass
class Join:
    """A row that joins a running `Engine.stream` (see `Feed`): its prompt segments, seed, whether its
    answer starts with an image, and its own token limit (None: the call's `max_new_tokens`)."""

    prompt: Prompt
    seed: int
    force_image: bool = False
    max_new_tokens: int | None = None


class Feed(Protocol):
    """Changes a running `Engine.stream` between decode steps. Both methods are called once per step,
    from the thread that iterates the stream."""

    def cancelled(self) -> Collection[int]:
        """Rows to end now (each ends with `RowDone(row, "cancelled")`); unknown or ended rows are ignored."""

    def joins(self, running: int) -> Sequence[Join]:
        """Rows to add now, while `running` rows are in the batch; they share the call's options and
        take the next row numbers in order."""


@dataclass
class _Rows:
    """The rows running in one generation call, one batch slot each (B slots). `ids` are the row
    numbers that events and `outputs` use; a row's slot changes as other rows leave or join. What the
    host decides on (limits, ends, positions) is kept on the host, refreshed by one read per step."""

    ids: list[int]
    cache: KVCache
    last: Tensor  # (B, D) hidden state of each row's newest token
    seeds: list[int]
    generators: list[torch.Generator]
    forced: Tensor  # (B,) a token to emit next instead of sampling (-1: none)
    n_images: Tensor  # (B,) images drawn so far
    done: list[bool]  # the row ended this step; it leaves the batch before the next
    left: list[int]  # decode steps left before the row ends with "length"
    positions: list[int]  # the host's copy of cache.next_position as of the last read
    outputs: list[list]  # per row id (ended rows too), the generated segments

    def select(self, keep: list[bool]) -> _Rows:
        """Only the slots where `keep` is True; cache slots no remaining row uses are dropped."""
        pick = [i for i, k in enumerate(keep) if k]
        idx = torch.tensor(pick, dtype=torch.long, device=self.last.device)
        return _Rows([self.ids[i] for i in pick], self.cache.select(idx).drop_empty(), self.last[idx],
                     [self.seeds[i] for i in pick], [self.generators[i] for i in pick], self.forced[idx],
                     self.n_images[idx], [self.done[i] for i in pick], [self.left[i] for i in pick],
                     [self.positions[i] for i in pick], self.outputs)

    def merge(self, new: _Rows) -> _Rows:
        """These rows followed by `new` (whose ids continue this call's numbering) in one batch."""
        outputs = self.outputs + new.outputs
        if not self.ids:
            return _Rows(**{**vars(new), "outputs": outputs})
        return _Rows(self.ids + new.ids, pad_and_stack([self.cache, new.cache]), torch.cat([self.last, new.last]),
                     self.seeds + new.seeds, self.generators + new.generators, torch.cat([self.forced, new.forced]),
                     torch.cat([self.n_images, new.n_images]), self.done + new.done, self.left + new.left,
                     self.positions + new.positions, outputs)


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
        self.banned = torch.tensor([self.tok.pad_id, self.tok.bos_id, self.tok.eoi_id,
                                    getattr(self.tok, "unk_id", self.tok.pad_id)], device=model.device)
        self.image_room = model.config.image.tokens_per_image + 2  # <boi> image <eoi>

    def null_prefix(self) -> tuple[KVCache, Tensor]:
        """`<bos> <boi>` prefilled: the unconditional branch of guidance; its cache and hidden state (1, D)."""
        return self.model.prefill(self.builder([[[self.tok.boi_id]]], add_eos=False))

    def generate(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None,
                 seed: int | Sequence[int] = 0, force_image: bool | Sequence[bool] = False,
                 stop: Sequence[int] = (), max_new_tokens: Sequence[int] | None = None) -> list[list[list[int] | Tensor]]:
        """`stream` to the end; returns per row the generated segments: token-id lists (without
        special ids) and images (C, H, W) in [-1, 1]."""
        for event in self.stream(prompts, options, seed, force_image, stop, max_new_tokens):
            if isinstance(event, Done):
                return event.outputs
        raise AssertionError("stream ended without Done")

    @torch.no_grad()
    def stream(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None,
               seed: int | Sequence[int] = 0, force_image: bool | Sequence[bool] = False,
               stop: Sequence[int] = (), max_new_tokens: Sequence[int] | None = None,
               feed: Feed | None = None) -> Iterator[Event]:
        """Continue each prompt until <eos> (or a `stop` id), its token limit or the context limit.

        Args:
            prompts: per row, segments of token ids (list[int]) and images (C, H, W) in [-1, 1].
            options: sampling settings; image options the model's interface does not take are an error.
            seed: one per row (or a base seed: row i uses seed + i); a row's output depends only
                on its prompt and its seed, not on the rest of the batch.
            force_image: start the answer with <boi> (for every row, or per row).
            stop: more ids that end a row like <eos> (e.g. <|end|> for a chat turn); not returned.
            max_new_tokens: per row, its limit of decode steps (None: `options.max_new_tokens` for all).
            feed: ends rows and adds rows between decode steps (continuous batching); None: the
                batch is the prompts.

        Yields:
            `mmgen.events`: Token, ImageStart, ImageStep, ImageDone, RowDone as they happen, then Done.
        """
        opts = options or GenerationOptions()
        if opts.best_of != 1:
            raise OptionError(f"best_of = {opts.best_of}: the engine draws one answer per row; best-of-N is chosen "
                              "by Pipeline.draw / draw_best and Chat (mmgen.scoring), or give the engine N rows")
        image_opts = self.model.image.options(opts)  # checked before any work
        rows = self._start(prompts, opts, seed, force_image, max_new_tokens)
        ends = {self.tok.eos_id, *stop}
        while True:
            rows = yield from self._settle(rows, feed)
            joins = feed.joins(len(rows.ids)) if feed is not None else ()
            if joins:
                rows = rows.merge(self._start(
                    [j.prompt for j in joins], opts, [j.seed for j in joins], [j.force_image for j in joins],
                    [opts.max_new_tokens if j.max_new_tokens is None else j.max_new_tokens for j in joins],
                    first=len(rows.outputs)))
            if not rows.ids:
                break
            nxt = self._next_tokens(rows, opts)  # every row in the batch is running
            tokens, rows.positions = torch.stack([nxt, rows.cache.next_position]).tolist()  # the step's one read
            drawing = []
            for i, (row, token) in enumerate(zip(rows.ids, tokens)):
                rows.left[i] -= 1
                if token in ends:
                    rows.done[i] = True
                    yield RowDone(row, "stop")
                elif token == self.tok.boi_id:
                    drawing.append(i)
                elif token != self.tok.eoi_id:
                    _append_token(rows.outputs[row], token)
                    yield Token(row, token)
            if drawing:
                yield from self._draw(rows, drawing, image_opts)
        yield Done(rows.outputs)

    def _settle(self, rows: _Rows, feed: Feed | None) -> Generator[Event, None, _Rows]:
        """End the rows out of steps or context ("length") and those the feed cancels; return the
        batch without the rows that ended."""
        max_pos = self.model.config.backbone.max_position_embeddings
        cancelled = set(feed.cancelled()) if feed is not None else set()
        for i, row in enumerate(rows.ids):
            length = rows.left[i] <= 0 or rows.positions[i] >= max_pos
            reason = "cancelled" if row in cancelled else "length" if length else None
            if reason and not rows.done[i]:
                rows.done[i] = True
                yield RowDone(row, reason)
        return rows.select([not d for d in rows.done]) if any(rows.done) else rows

    def _start(self, prompts: Sequence[Prompt], opts: GenerationOptions, seed: int | Sequence[int],
               force_image: bool | Sequence[bool], max_new_tokens: Sequence[int] | None, first: int = 0) -> _Rows:
        """Validate the rows, prefill their prompts and set up their state; they are numbered from `first`."""
        m, b = self.model, len(prompts)
        if not b:
            raise InputError("no prompts: give at least one")
        seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
        if len(seeds) != b:
            raise OptionError(f"{len(seeds)} seeds for {b} prompts: give one seed, or one per prompt")
        limits = [opts.max_new_tokens] * b if max_new_tokens is None else list(max_new_tokens)
        if len(limits) != b:
            raise OptionError(f"{len(limits)} max_new_tokens for {b} prompts: give one per prompt")
        for i, (s, n) in enumerate(zip(seeds, limits)):
            row = f" of row {first + i}" if b > 1 or first else ""
            check_number(f"seed{row}", s, low=0, high=MAX_SEED, integer=True)
            check_number(f"max_new_tokens{row}", n, low=0, integer=True)
        force = [force_image] * b if isinstance(force_image, bool) else list(force_image)
        if len(force) != b:
            raise ValueError(f"{len(force)} force_image flags for {b} prompts")
        if any(force) and opts.max_images < 1:
            raise ValueError("force_image needs max_images >= 1")
        max_pos = m.config.backbone.max_position_embeddings
        room = min(max(limits) + opts.max_images * m.config.image.tokens_per_image, max_pos)  # decoding never grows it
        cache, last = m.prefill(self.builder(prompts, add_eos=False), room)
        positions = cache.next_position.tolist()
        for i, f in enumerate(force):
            if f and positions[i] + self.image_room > max_pos:
                raise ValueError(
                    f"prompt {first + i} is {positions[i]} tokens long: an image needs "
                    f"{self.image_room} more positions and the model holds {max_pos}; shorten the prompt"
                )
        dev = m.device
        return _Rows(
            list(range(first, first + b)), cache, last, seeds,
            [torch.Generator(device=dev).manual_seed(s) for s in seeds],
            forced=torch.tensor([self.tok.boi_id if f else -1 for f in force], device=dev),
            n_images=torch.zeros(b, dtype=torch.long, device=dev), done=[False] * b, left=list(limits),
            positions=positions, outputs=[[] for _ in range(b)],
        )

    def _next_tokens(self, rows: _Rows, opts: GenerationOptions) -> Tensor:
        """Sample (or take the forced) next token of every row (B,) and feed it to the cache; reads no
        device value (the step's tokens are read once by the caller)."""
        m = self.model
        logits = m.logits(rows.last).float()  # (B, V)
        logits.index_fill_(1, self.banned.to(logits.device), float("-inf"))
        max_pos = m.config.backbone.max_position_embeddings
        no_image = (rows.n_images >= opts.max_images) | (rows.cache.next_position + self.image_room > max_pos)
        logits[:, self.tok.boi_id] = logits[:, self.tok.boi_id].masked_fill(no_image, float("-inf"))
        sampled = sample_token(logits, rows.generators, opts.temperature, opts.top_k, opts.top_p, opts.min_p)
        nxt = torch.where(rows.forced >= 0, rows.forced, sampled)
        rows.forced.fill_(-1)
        everyone = torch.ones(len(nxt), dtype=torch.bool, device=nxt.device)
        rows.last = m.extend(rows.cache, m.embed(nxt[:, None]), everyone, False)[:, -1]  # (B, D)
        return nxt

    def _draw(self, rows: _Rows, drawing: list[int], image_opts) -> Iterator[Event]:
        """Draw one image for each row slot in `drawing` through the interface, commit it to the cache
        (the clean pass), and force <eoi> next."""
        m = self.model
        idx = torch.tensor(drawing, dtype=torch.long, device=rows.last.device)  # (R,)
        which = [rows.ids[i] for i in drawing]  # row numbers
        yield ImageStart(which)
        counts = rows.n_images[idx].tolist()
        request = DrawRequest(
            m, rows.cache.select(idx), rows.last[idx], self.null_prefix, image_opts,
            [rows.generators[i] for i in drawing],
            [rows.seeds[i] * 1_000_003 + n for i, n in zip(drawing, counts)],  # one noise path per row and image
        )
        tokens = yield from relay(m.image.draw(request), lambda e: ImageStep([which[i] for i in e.rows], e.step,
                                                                            e.steps, e.denoised))
        self.step_cache = request.step_cache
        embedded = m.embed_drawn(tokens)  # (R, L, D), as the model reads images
        full = embedded.new_zeros(len(rows.ids), *embedded.shape[1:])  # rows not drawing get masked slots
        full[idx] = embedded
        mask = torch.zeros(len(rows.ids), dtype=torch.bool, device=idx.device)
        mask[idx] = True
        m.extend(rows.cache, full, mask, True)  # the clean pass
        rows.positions = rows.cache.next_position.tolist()
        for i, image in zip(which, m.decode_images(tokens)):
            rows.outputs[i].append(image)
            yield ImageDone(i, image)
        rows.n_images += mask.long()
        rows.forced = torch.where(mask, self.tok.eoi_id, rows.forced)


def _append_token(segments: list, token: int) -> None:
    if not segments or not isinstance(segments[-1], list):
        segments.append([])
    segments[-1].append(token)
