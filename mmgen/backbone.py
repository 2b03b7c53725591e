"""LLaMA decoder: RMSNorm, RoPE (HF split-halves convention), SwiGLU, grouped-query attention.

Parameter names match Hugging Face `LlamaModel` (`layers.{i}.self_attn.q_proj.weight`, ...), so HF
weights load with an identity key map. Every layer reads one `AttentionContext`: rotary cos/sin,
an explicit boolean mask (True = attend) built by `mmgen.sequence`, and the KV cache
(`mmgen.kv_cache`: preallocated buffers each layer writes its chunk into, plus the per-slot metadata
that mask needs). `run_layers(x, ctx, start, stop)` runs any slice of
the layers, so wrappers (First Block Cache, checkpointing, compilation) need no branch in here.
With `image_experts` (LMFusion) every layer also holds `image_expert`, its own copy of the layer's
projections, MLP and norms: the context's image slots run through it, text through the HF-named weights,
and attention stays one joint softmax over both (`Routing`). The final norm is shared.

Shapes: B batch, T query tokens, S key tokens (cache + chunk), D hidden, H query heads,
K key/value heads, E head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.attention import attend
from mmgen.config import BackboneConfig
from mmgen.kv_cache import KVCache
from mmgen.positions import section_index


class RMSNorm(nn.Module):
    """x / rms(x) computed in float32, cast back to the input dtype, then times weight (HF order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE angles from float32 inverse frequencies, which stay float32 when the model is cast to
    bf16/fp16 (a half-precision inv_freq is off by radians at position 1,000). Positions are one per
    token, or M-RoPE's three (`mmgen.positions`), each turning its own section of the frequencies."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.frequencies(torch.device("cpu")), persistent=False)
        self.register_buffer("section", section_index(head_dim), persistent=False)  # (E/2,) component per pair

    def frequencies(self, device: torch.device) -> Tensor:
        """(E/2,) float32 inverse frequencies θ^(−2i/E)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # moves (and maybe casts) inv_freq; recompute it in float32 where it went
        self.inv_freq = self.frequencies(self.inv_freq.device)
        return self

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, T), or (B, T, 3) M-RoPE components -> cos, sin (B, 1, T, E)."""
        per_pair = positions[..., self.section] if positions.dim() == 3 else positions[..., None]  # (B, T, E/2 or 1)
        freqs = per_pair.float() * self.inv_freq  # (B, T, E/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, E)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


@dataclass
class Routing:
    """Which tokens of a chunk run through the image experts. `kind`: "text" or "image" (every token one
    way: one path, no copy), "mixed" (`text` and `image` index the flattened (B·T,) tokens; each path runs
    on its own tokens only) or "select" (both paths over every token, `image` (B, T) picks per token: no
    device read and static shapes, for cached chunks, which CUDA graphs capture)."""

    kind: str
    text: Tensor | None = None
    image: Tensor | None = None

    @classmethod
    def of(cls, image: Tensor, cached: bool) -> Routing:
        """The routing of a chunk whose image slots are `image` (B, T) bool."""
        if cached:
            return cls("select", image=image)
        where = image.flatten().nonzero().flatten()  # (n_image,): the one device read of the forward
        if len(where) == 0:
            return cls("text")
        if len(where) == image.numel():
            return cls("image")
        return cls("mixed", (~image).flatten().nonzero().flatten(), where)


@dataclass
class AttentionContext:
    """What every layer reads besides its input: rotary cos/sin (B, 1, T, E), the boolean mask
    (B, 1, T, S), the cache (None: the chunk is the whole sequence) and the image slots (B, T) bool (the
    tokens that image experts take). With a cache, each layer writes the chunk's keys/values at `slots`
    (T,) of its buffers and attends over their first S slots."""

    cos: Tensor
    sin: Tensor
    mask: Tensor
    cache: KVCache | None = None
    slots: Tensor | None = None
    image: Tensor | None = None

    def past(self, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """One layer's key and value buffers (B, K, C, E) and the chunk's slots (T,) in them, or None."""
        return (self.cache.keys[layer], self.cache.values[layer], self.slots) if self.cache is not None else None

    def select(self, rows: Tensor) -> AttentionContext:
        """The same context for a subset of the batch rows (B',), over a copy of their cache rows."""
        cache = self.cache.select(rows) if self.cache is not None else None
        image = self.image[rows] if self.image is not None else None
        return AttentionContext(self.cos[rows], self.sin[rows], self.mask[rows], cache, self.slots, image)

    def routing(self) -> Routing:
        """How the image experts split this chunk; raises if the context was built without image slots."""
        if self.image is None:
            raise ValueError("this model has image experts, but its attention context carries no image slots "
                             "(AttentionContext.image); build contexts with MMGenModel.context, and copy `image` "
                             "into a context rebuilt from one")
        return Routing.of(self.image, self.cache is not None)


def routed(text: Callable[..., tuple[Tensor, ...]], image: Callable[..., tuple[Tensor, ...]], route: Routing | None,
           *inputs: Tensor) -> tuple[Tensor, ...]:
    """`text(*inputs)` on text tokens and `image(*inputs)` on image slots, by `route` (None: all text).
    Inputs are (B, T, ...), and so is each output."""
    if route is None or route.kind == "text":
        return text(*inputs)
    if route.kind == "image":
        return image(*inputs)
    if route.kind == "select":
        pairs = zip(text(*inputs), image(*inputs))
        return tuple(torch.where(route.image.view(*route.image.shape, *[1] * (a.dim() - 2)), c, a) for a, c in pairs)
    b, t = inputs[0].shape[:2]
    flat = [x.flatten(0, 1) for x in inputs]  # (B·T, ...)
    by_text = text(*(x[route.text] for x in flat))  # (n_text, ...)
    by_image = image(*(x[route.image] for x in flat))  # (n_image, ...)
    out = []
    for a, c in zip(by_text, by_image):
        merged = a.new_empty(b * t, *a.shape[1:])  # (B·T, ...)
        merged.index_copy_(0, route.text, a)
        merged.index_copy_(0, route.image, c)
        out.append(merged.view(b, t, *a.shape[1:]))  # (B, T, ...)
    return tuple(out)


class Attention(nn.Module):
    """Grouped-query attention in two halves around the routing: `project` (weights: per modality) and
    `joint` (RoPE, the cache, the kernel: one joint softmax over every token); `o_proj` follows."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., D) -> q (..., H, E), k and v (..., K, E); q and k normed when QK-norm is on."""
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))  # (..., H, E)
        k = self.k_proj(x).unflatten(-1, (self.n_kv, self.head_dim))  # (..., K, E)
        v = self.v_proj(x).unflatten(-1, (self.n_kv, self.head_dim))  # (..., K, E)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def joint(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
               past: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """q (B, T, H, E), k/v (B, T, K, E), mask (B, 1, T, S) -> outputs (B, T, H·E) before o_proj, and the
        keys/values (B, K, S, E) attended to.

        `past`: the cache's key and value buffers (B, K, C, E) and the slots (T,) where this chunk's
        keys/values are written in place; attention then reads the buffers' first S slots."""
        b, t = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, E), (B, K, T, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            keys, values, slots = past
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
            s = mask.shape[-1]
            k, v = keys[:, :, :s], values[:, :, :s]  # (B, K, S, E): filled slots, this chunk (and empty ones)
        out = attend(q, k, v, mask)  # (B, H, T, E)
        return out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), (k, v)  # (B, T, H·E)


class MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One modality's weights of a decoder layer, under HF names: attention projections, MLP, both norms."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The residual stream x (..., D) -> q (..., H, E), k and v (..., K, E)."""
        return self.self_attn.project(self.input_layernorm(x))

    def finish(self, x: Tensor, attended: Tensor) -> tuple[Tensor]:
        """x (..., D) and the attention outputs (..., H·E) -> the layer's output (..., D)."""
        x = x + self.self_attn.o_proj(attended)
        return (x + self.mlp(self.post_attention_layernorm(x)),)


class DecoderLayer(Block):
    """A LLaMA layer; with `image_experts`, `image_expert` (a `Block`) takes the image slots (see `Routing`)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__(cfg)
        self.image_expert = Block(cfg) if cfg.image_experts else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past: tuple[Tensor, Tensor, Tensor] | None,
                route: Routing | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, D) -> (B, T, D) and the keys/values (B, K, S, E); `route` splits the tokens between the
        text weights and `image_expert` (None: all text)."""
        if self.image_expert is None:
            route = None
        image = self.image_expert if self.image_expert is not None else self
        q, k, v = routed(self.project, image.project, route, x)
        attended, kv = self.self_attn.joint(q, k, v, cos, sin, mask, past)
        (out,) = routed(self.finish, image.finish, route, x, attended)
        return out, kv


class LlamaModel(nn.Module):
    """Token embedding + decoder layers + final norm; the HF `model.` submodule."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # shared by both modalities (docs/pretrained.md)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.image_experts = cfg.image_experts

    def context(self, positions: Tensor, mask: Tensor, cache: KVCache | None = None,
                image: Tensor | None = None) -> AttentionContext:
        """positions (B, T) or (B, T, 3) (`mmgen.positions`), mask (B, 1, T, S), an optional cache the chunk is
        written to (at its length, room made if needed), the image slots (B, T) bool -> the layers' context."""
        cos, sin = self.rotary(positions, self.embed_tokens.weight.dtype)
        if cache is None:
            return AttentionContext(cos, sin, mask, image=image)
        t = positions.shape[1]
        cache.reserve(cache.length + t)
        return AttentionContext(cos, sin, mask, cache, cache.slots(t), image)

    def run_layers(
        self, x: Tensor, ctx: AttentionContext, start: int = 0, stop: int | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Layers [start, stop) over x (B, T, D) -> their output (B, T, D), not normed, and the
        keys/values (B, K, S, E) each layer attended to (with a cache: views of its buffers)."""
        kv = []
        route = ctx.routing() if self.image_experts else None  # which tokens the image experts take
        for i in range(start, len(self.layers) if stop is None else stop):
            x, layer_kv = self.layers[i](x, ctx.cos, ctx.sin, ctx.mask, ctx.past(i), route)
            kv.append(layer_kv)
        return x, kv

    def forward(self, x: Tensor, ctx: AttentionContext) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """All layers over embeddings x (B, T, D), then the final norm; returns hidden states
        (B, T, D) and per-layer keys/values over cache + chunk."""
        x, kv = self.run_layers(x, ctx)
        return self.norm(x), kv
