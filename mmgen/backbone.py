"""LLaMA decoder: RMSNorm, RoPE (HF split-halves convention), SwiGLU, grouped-query attention.

Parameter names match Hugging Face `LlamaModel` (`layers.{i}.self_attn.q_proj.weight`, ...), so HF
weights load with an identity key map. Attention takes an explicit boolean mask (True = attend)
built by `mmgen.sequence`; the KV cache also carries the per-key metadata that mask needs.

Shapes: B batch, T query tokens, S key tokens (cache + chunk), D hidden, H query heads,
K key/value heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.config import BackboneConfig
from mmgen.diffusion.step_cache import FirstBlockCache


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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
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

    def forward(
        self, x: Tensor, positions: Tensor, mask: Tensor, cache: KVCache | None = None,
        step_cache: FirstBlockCache | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Run the layers over embeddings.

        Args:
            x: input embeddings (B, T, D).
            positions: RoPE positions (B, T).
            mask: boolean attention mask (B, 1, T, S), S = cache length + T.
            cache: keys/values of earlier tokens, or None (the caller decides whether to keep the new ones).
            step_cache: First Block Cache state across denoising steps; when every row reuses its
                cache only the first block runs and no keys/values are returned.

        Returns:
            final-normed hidden states (B, T, D) and per-layer keys/values over all S keys.
        """
        cos, sin = self.rotary(positions, x.dtype)
        new_kv = []
        for i, layer in enumerate(self.layers):
            past = (cache.keys[i], cache.values[i]) if cache is not None and cache.keys else None
            x_in = x
            x, kv = layer(x, cos, sin, mask, past)
            new_kv.append(kv)
            if i == 0 and step_cache is not None:
                first_residual, after_first = x - x_in, x
                hit = step_cache.decide(first_residual)
                if hit.any():  # rows that reuse skip the remaining blocks; the others run them alone
                    rest = self._rest_with_reuse(x, first_residual, hit, cos, sin, mask, cache, step_cache)
                    return self.norm(x + rest), []
        if step_cache is not None:
            step_cache.update(first_residual, x - after_first, hit)
        return self.norm(x), new_kv

    def _rest_with_reuse(self, x, first_residual, hit, cos, sin, mask, cache, step_cache) -> Tensor:
        """Residual of layers 1.. for every row: cached where `hit`, computed on the missing rows only."""
        miss = (~hit).nonzero().flatten()
        rest = step_cache.rest.clone()  # (B, T, D)
        if len(miss):
            h = x[miss]
            for i, layer in enumerate(self.layers[1:], start=1):
                past = (cache.keys[i][miss], cache.values[i][miss]) if cache is not None and cache.keys else None
                h, _ = layer(h, cos[miss], sin[miss], mask[miss], past)
            rest[miss] = h - x[miss]
        step_cache.update(first_residual, rest, hit)
        return rest
