"""What `Engine.stream` yields while it writes: engine-level events on rows, ids and tensors.

    Token(row, id)                      a text token kept for that row
    ImageStart(rows)                    these rows emitted <boi> and start drawing one image each
    ImageStep(rows, step, steps, denoised)  progress of that drawing: step of steps (1-based);
                                        `denoised` (R, c, G, G) latents of the current clean estimate
                                        for interfaces that have one (diffusion), else None
    ImageDone(row, image)               the finished image (C, H, W) in [-1, 1]
    Done(outputs)                       per row, the generated segments (token-id lists and images)

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
class Done:
    outputs: list[list]


Event = Token | ImageStart | ImageStep | ImageDone | Done


def relay(steps: Generator[Any, None, R], convert: Callable[[Any], Any]) -> Generator[Any, None, R]:
    """Re-yield what `steps` yields through `convert`; return what `steps` returns (`x = yield from relay(...)`)."""
    while True:
        try:
            item = next(steps)
        except StopIteration as done:
            return done.value
        yield convert(item)
