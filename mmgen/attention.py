"""The attention kernel every decoder layer calls: q, k, v and the context's mask -> outputs.

One function, so the kernel choice (SDPA with an explicit boolean mask today) lives in one place
and the layers never branch on it.

Shapes: B batch, H query heads, K key/value heads, T query tokens, S key tokens, E head dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q (B, H, T, E), k/v (B, K, S, E), mask (B, 1, T, S) True = attend -> (B, H, T, E)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
