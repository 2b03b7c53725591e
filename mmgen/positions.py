"""RoPE positions: one per token ("1d"), or M-RoPE's three per token ("2d", Qwen2-VL) for image grids.

"1d": positions are (B, T), the token's index in its document. "2d": positions are (B, T, 3), the
(sequence, row, column) components. A text token has its position p in all three, so a text-only row
rotates exactly as under "1d". Slot k = r·g + c of a g×g image whose first slot is at p has
(p, p + r, p + c); the token after the image (<eoi>) continues at p + g (Qwen2-VL's "largest position
used + 1"), so an image takes g positions of the sequence instead of g². A head's rotary frequency
pairs are shared out among the three components, interleaved (`section_index`): each turns a third of
the pairs, from the fastest to the slowest.
Shapes: B rows, T tokens, E head dim, g tokens along an image side, L = g² tokens per image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def section_index(head_dim: int) -> Tensor:
    """(E/2,) the component (0 sequence, 1 row, 2 column) that turns each frequency pair: pair j turns with
    component j mod 3 (the interleaved layout of Qwen3-VL), so rows and columns each get frequencies from
    the fastest to the slowest. Qwen2-VL's contiguous sections ([16, 24, 24] at E = 128, the sequence
    first) leave the columns only the slowest third: at E = 48 and θ = 10⁴ one step along a row turned
    them by at most 0.003 rad, too little to tell the columns of a small grid apart."""
    return torch.arange(head_dim // 2) % 3


def sequence_positions(positions: Tensor, image_id: Tensor, grid: int, mode: str) -> Tensor:
    """RoPE positions of whole documents.

    Args:
        positions: (B, T) sequence positions, restarting at 0 in every document (as `SequenceBuilder`
            and training's packing give them; padding anywhere).
        image_id: (B, T) image slots (>= 0), whole images of grid² slots in raster order.
        grid: g, tokens along an image side.
        mode: "1d" (positions returned as they are) or "2d".
    Returns:
        (B, T) under "1d", (B, T, 3) under "2d".
    """
    if mode == "1d":
        return positions
    size = grid * grid
    slot = (image_id >= 0).long()  # (B, T)
    before = slot.cumsum(1) - slot  # (B, T) image slots before each token in its row
    start = (torch.arange(positions.shape[1], device=positions.device) - positions).clamp(min=0)  # (B, T)
    before = before - before.gather(1, start)  # (B, T) image slots before it in its document (start: doc's 1st)
    k = before % size  # (B, T) index inside its image (0 for text: images before it are whole)
    base = positions - k - before // size * (size - grid)  # (B, T) its image's first position, or its own
    return torch.stack([base, base + k // grid, base + k % grid], -1)  # (B, T, 3)


def chunk_positions(start: Tensor, length: int, mode: str, grid: int | None = None) -> Tensor:
    """RoPE positions of a chunk after cached tokens, each row's first at `start` (B,): `length` text tokens
    (grid None), or one whole image (grid given; under "2d" it must hold grid² tokens).

    Returns (B, T) under "1d" (start + i, images included), (B, T, 3) under "2d"."""
    steps = torch.arange(length, device=start.device)  # (T,)
    if mode == "1d":
        return start[:, None] + steps  # (B, T)
    if grid is None:
        return (start[:, None] + steps)[..., None].expand(-1, -1, 3)  # (B, T, 3): text, one position in all
    if length != grid * grid:
        raise ValueError(f"a chunk of {length} image tokens: 2-D positions place whole images of {grid}×{grid} tokens")
    cell = torch.stack([torch.zeros_like(steps), steps // grid, steps % grid], -1)  # (T, 3)
    return start[:, None, None] + cell  # (B, T, 3)


def advance(length: int, mode: str, grid: int | None = None) -> int:
    """How far a chunk of `length` tokens moves a row's next position: `length`, or g for an image under "2d"."""
    return grid if mode == "2d" and grid is not None else length


def next_position(positions: Tensor, lengths: Tensor) -> Tensor:
    """(B,) the position after each row's last token, from RoPE positions (B, T) or (B, T, 3) and row lengths (B,)."""
    last = positions[torch.arange(len(lengths), device=lengths.device), lengths - 1]  # (B,) or (B, 3)
    return (last if last.dim() == 1 else last[:, 0]) + 1
