"""The attention kernel every decoder layer calls: q, k, v and the context's mask -> outputs.

One function, so the kernel choice lives here and the layers never branch on it. The mask is either
a dense boolean tensor (SDPA: CPU, cached chunks, one-token decoding) or a FlexAttention `BlockMask`
built once per batch from the same rule (`mmgen.sequence.mask_mod`): packed rows of several documents
and images then cost only their unmasked blocks. `kernel_for` resolves the `auto | dense | flex` setting.

Shapes: B batch, H query heads, K key/value heads, T query tokens, S key tokens, E head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

KERNELS = ("auto", "dense", "flex")


def kernel_for(setting: str, device: torch.device) -> str:
    """The kernel of an uncached chunk: 'auto' is 'flex' on CUDA and 'dense' elsewhere; 'dense' and 'flex'
    stay. FlexAttention's backward runs on CUDA only (torch refuses it on CPU)."""
    if setting not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)}, got {setting!r}")
    if setting == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return setting


def block_mask(mask_mod: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], batch: int, length: int,
               device: torch.device) -> BlockMask:
    """The FlexAttention block mask of `mask_mod(b, h, q, k)` over (B, T, T), the same for every head."""
    return create_block_mask(mask_mod, batch, None, length, length, device=device)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """flex_attention compiled once per process: uncompiled it materializes the whole score matrix."""
    return torch.compile(flex_attention)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask) -> Tensor:
    """q (B, H, T, E), k/v (B, K, S, E), mask (B, 1, T, S) True = attend or a BlockMask -> (B, H, T, E)."""
    gqa = k.shape[1] != q.shape[1]
    if not isinstance(mask, BlockMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    device = q.device.type
    # autocast does not reach flex_attention: give it one dtype (the autocast one, as SDPA would get)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # inside a compiled layer dynamo fuses flex_attention itself; eager on CUDA it needs its compiled wrapper;
    # on a CPU it is the reference path (forward only: torch refuses its backward there)
    compiled = device == "cuda" and not torch.compiler.is_compiling()
    kernel = _compiled_flex() if compiled else flex_attention
    return kernel(q, k, v, block_mask=mask, enable_gqa=gqa)
