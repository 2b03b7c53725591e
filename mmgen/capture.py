"""Backbone steps over a KV cache at static shapes, captured as CUDA graphs on CUDA.

`run(backbone, x, ctx)` is the one call generation makes for a backbone step over a cache (a decode
step, a denoising step, a token of a causal image, the clean pass). On CUDA a step that repeats
(one token, or a chunk the caller says repeats, such as a denoising step) runs over the cache's whole
capacity, so its shapes (B, T, C) stay fixed from step to step: the inputs are copied into static
tensors, the mask is padded with False to C slots, and the layers are captured once as a CUDA graph
and then replayed, which removes the per-kernel launch cost that bounds small models. Modes:
    "auto"    the above on CUDA; the plain call elsewhere (default)
    "eager"   always the plain call over the filled slots (S = length + T)
    "static"  the static-shape step without a graph: what "auto" captures, runnable on CPU (tests)
A captured step belongs to the cache whose buffers it writes (`KVCache.steps`); a new cache (select,
pad_and_stack, growth) captures its own. Shapes: B rows, T tokens, D hidden, C capacity, E head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mmgen.backbone import AttentionContext
from mmgen.errors import check_choice
from mmgen.kv_cache import KVCache

MODES = ("auto", "eager", "static")
_mode = "auto"


def set_mode(mode: str) -> None:
    """Choose how cached steps run from now on (one of MODES); raises OptionError for another name."""
    global _mode
    check_choice("capture mode", mode, MODES)
    _mode = mode


@contextlib.contextmanager
def using(mode: str) -> Iterator[None]:
    """`set_mode(mode)` inside the `with` block, the previous mode after it."""
    before = _mode
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(before)


def run(backbone: nn.Module, x: Tensor, ctx: AttentionContext, repeats: bool | None = None) -> Tensor:
    """Final-normed hidden states (B, T, D) of `backbone` (an `mmgen.backbone.LlamaModel`) over x (B, T, D)
    in `ctx`. `repeats`: whether steps of this shape recur over this cache (None: only single tokens do);
    a one-off chunk (the clean pass of an image) is never captured."""
    graph = _mode == "auto" and x.device.type == "cuda"
    repeating = repeats if repeats is not None else x.shape[1] == 1
    if ctx.cache is None or not repeating or not (graph or _mode == "static"):
        return backbone(x, ctx)[0]
    key = (tuple(x.shape), ctx.cache.capacity)
    step = ctx.cache.steps.get(key)
    if step is None:
        step = ctx.cache.steps[key] = StaticStep(backbone, x, ctx, graph)
    return step(x, ctx)


class StaticStep:
    """One backbone step of fixed shapes over one cache's buffers: static input tensors, and on CUDA the
    graph captured over them. Call it with each step's inputs; returns the hidden states (B, T, D)."""

    def __init__(self, backbone: nn.Module, x: Tensor, ctx: AttentionContext, graph: bool):
        b, t, _ = x.shape
        c = ctx.cache
        self.backbone = backbone
        self.x, self.cos, self.sin, self.slots = x.clone(), ctx.cos.clone(), ctx.sin.clone(), ctx.slots.clone()
        self.mask = ctx.mask.new_zeros(b, 1, t, c.capacity)  # (B, 1, T, C)
        buffers = KVCache(c.keys, c.values, c.slot_doc, c.slot_image, c.next_position, c.length, c.images)
        self.image = ctx.image.clone() if ctx.image is not None else None  # (B, T) image slots (image experts)
        self.ctx = AttentionContext(self.cos, self.sin, self.mask, buffers, self.slots, self.image)  # no cycle to `c`
        self.wants_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None

    def load(self, x: Tensor, ctx: AttentionContext) -> None:
        """Copy a step's inputs into the static tensors; the mask (B, 1, T, S) is padded with False to C."""
        s = ctx.mask.shape[-1]
        self.x.copy_(x)
        self.cos.copy_(ctx.cos)
        self.sin.copy_(ctx.sin)
        self.slots.copy_(ctx.slots)
        if self.image is not None:
            self.image.copy_(ctx.image)
        self.mask[..., :s] = ctx.mask
        self.mask[..., s:] = False

    def __call__(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        self.load(x, ctx)
        if not self.wants_graph:
            return self.backbone(self.x, self.ctx)[0]
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`

    def capture(self) -> None:
        """Warm up on a side stream (lazy kernel and workspace set-up must not be captured), then record the
        layers over the static tensors. The warm-up writes the cache exactly as the replay that follows will."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.backbone(self.x, self.ctx)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # `mmgen serve`: one worker thread
            self.out = self.backbone(self.x, self.ctx)[0]
