"""What `Engine.stream` yields while it writes: engine-level events on rows, ids and tensors.

    Token(row, id)                      a text token kept for that row
    ImageStart(rows)                    these rows emitted <boi> and start drawing one image each
    ImageStep(rows, step, steps, denoised)  progress of that drawing: step of steps (1-based);
                                        `denoised` (R, c, G, G) latents of the current clean estimate
                                        for interfaces that have one (diffusion), else None
    ImageDone(row, image)               the finished image (C, H, W) in [-1, 1]
    RowDone(row, reason)                the row ended: "stop" (<eos> or a stop id), "length" (its token
                                        limit or the context) or "cancelled" (its `Feed` said so)
    Done(outputs)                       per row, the generated segments (token-id lists and images)

Rows are numbered in order of arrival: a call's prompts 0..B-1, then rows that join a running call
(`mmgen.generation.Feed`) the next numbers.

`mmgen.chat` maps them to the user-facing events (text deltas, PIL images).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor

R = TypeVar("R")


@dataclass
class Token:
    row: int
    id: int


@dataclass
class ImageStart:
    rows: list[int]


@dataclass
class ImageStep:
    rows: list[int]
    step: int  # 1-based
    steps: int
    denoised: Tensor | None = None


@dataclass
class ImageDone:
    row: int
    image: Tensor


@dataclass
class RowDone:
    row: int
    reason: str  # "stop" | "length" | "cancelled"


@dataclass
class Done:
    outputs: list[list]


Event = Token | ImageStart | ImageStep | ImageDone | RowDone | Done


def relay(steps: Generator[Any, None, R], convert: Callable[[Any], Any]) -> Generator[Any, None, R]:
    """Re-yield what `steps` yields through `convert`; return what `steps` returns (`x = yield from relay(...)`)."""
    while True:
        try:
            item = next(steps)
        except StopIteration as done:
            return done.value
        yield convert(item)
