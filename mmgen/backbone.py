"""LLaMA decoder: RMSNorm, RoPE (HF split-halves convention), SwiGLU, grouped-query attention.

Parameter names match Hugging Face `LlamaModel` (`layers.{i}.self_attn.q_proj.weight`, ...), so HF
weights load with an identity key map. Every layer reads one `AttentionContext`: rotary cos/sin,
an explicit boolean mask (True = attend) built by `mmgen.sequence`, and the KV cache (which also
carries the per-key metadata that mask needs). `run_layers(x, ctx, start, stop)` runs any slice of
the layers, so wrappers (First Block Cache, checkpointing, compilation) need no branch in here.

Shapes: B batch, T query tokens, S key tokens (cache + chunk), D hidden, H query heads,
K key/value heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.attention import attend
from mmgen.config import BackboneConfig


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
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, E)."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, E/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, E)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


@dataclass
class KVCache:
    """Keys/values of every layer plus the metadata the attention rule needs for each cached key.

    keys[l], values[l]: (B, K, S, E); doc_id: (B, S), -1 marks an empty slot; image_id: (B, S), -1 text.
    """

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    doc_id: Tensor | None = None
    image_id: Tensor | None = None
    next_position: Tensor | None = None  # (B,) RoPE position of the next token of each row

    @property
    def length(self) -> int:
        return 0 if self.doc_id is None else self.doc_id.shape[1]

    def select(self, rows: Tensor) -> KVCache:
        """A new cache holding only the given batch rows (B',); this cache is left as it is."""
        return KVCache(
            [k[rows] for k in self.keys], [v[rows] for v in self.values],
            self.doc_id[rows], self.image_id[rows], self.next_position[rows],
        )

    def drop_empty(self) -> KVCache:
        """This cache without the slots that are empty in every row (left behind by rows that left the
        batch); attention depends on slot order and metadata only, so the rows' outputs do not change."""
        used = (self.doc_id >= 0).any(0)  # (S,)
        if bool(used.all()):
            return self
        return KVCache(
            [k[:, :, used] for k in self.keys], [v[:, :, used] for v in self.values],
            self.doc_id[:, used], self.image_id[:, used], self.next_position,
        )


def pad_and_stack(caches: list[KVCache]) -> KVCache:
    """Concatenate caches along the batch, right-padding shorter ones with empty (masked) slots."""
    s = max(c.length for c in caches)

    def pad(t: Tensor, fill: float, dim: int) -> Tensor:
        amount = s - t.shape[dim]
        if amount == 0:
            return t
        shape = list(t.shape)
        shape[dim] = amount
        return torch.cat([t, t.new_full(shape, fill)], dim=dim)

    n_layers = len(caches[0].keys)
    return KVCache(
        [torch.cat([pad(c.keys[i], 0.0, 2) for c in caches]) for i in range(n_layers)],
        [torch.cat([pad(c.values[i], 0.0, 2) for c in caches]) for i in range(n_layers)],
        torch.cat([pad(c.doc_id, -1, 1) for c in caches]),
        torch.cat([pad(c.image_id, -1, 1) for c in caches]),
        torch.cat([c.next_position for c in caches]),
    )


@dataclass
class AttentionContext:
    """What every layer reads besides its input: rotary cos/sin (B, 1, T, E), the boolean mask
    (B, 1, T, S) and the cache of earlier keys (None: the chunk is the whole sequence)."""

    cos: Tensor
    sin: Tensor
    mask: Tensor
    cache: KVCache | None = None

    def past(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """Cached keys/values (B, K, S − T, E) of one layer, or None."""
        return (self.cache.keys[layer], self.cache.values[layer]) if self.cache is not None else None

    def select(self, rows: Tensor) -> AttentionContext:
        """The same context for a subset of the batch rows (B',)."""
        cache = self.cache.select(rows) if self.cache is not None else None
        return AttentionContext(self.cos[rows], self.sin[rows], self.mask[rows], cache)


class Attention(nn.Module):
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

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, D), mask (B, 1, T, S) -> (B, T, D) and this layer's keys/values (B, K, S, E)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, K, S, E)
        out = attend(q, k, v, mask)  # (B, H, T, E)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H·E)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaModel(nn.Module):
    """Token embedding + decoder layers + final norm; the HF `model.` submodule."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def context(self, positions: Tensor, mask: Tensor, cache: KVCache | None = None) -> AttentionContext:
        """positions (B, T), mask (B, 1, T, S), an optional cache of S − T earlier keys -> the layers' context."""
        cos, sin = self.rotary(positions, self.embed_tokens.weight.dtype)
        return AttentionContext(cos, sin, mask, cache if cache is not None and cache.length else None)

    def run_layers(
        self, x: Tensor, ctx: AttentionContext, start: int = 0, stop: int | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Layers [start, stop) over x (B, T, D) -> their output (B, T, D), not normed, and each
        layer's keys/values (B, K, S, E) over cache + chunk."""
        kv = []
        for i in range(start, len(self.layers) if stop is None else stop):
            x, layer_kv = self.layers[i](x, ctx.cos, ctx.sin, ctx.mask, ctx.past(i))
            kv.append(layer_kv)
        return x, kv

    def forward(self, x: Tensor, ctx: AttentionContext) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """All layers over embeddings x (B, T, D), then the final norm; returns hidden states
        (B, T, D) and per-layer keys/values over cache + chunk."""
        x, kv = self.run_layers(x, ctx)
        return self.norm(x), kv
