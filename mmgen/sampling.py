"""Sampling settings of a generation call, and the token sampler that text and codes share.

`GenerationOptions` is the one flat set of options users pass (Python, CLI, chat). The text fields
belong to the engine; the image fields (`IMAGE_OPTIONS`) are handed to the image interface, which
takes the subset it understands as its own typed dataclass (`ImageInterface.options`) and rejects
the others when they are set, so no option is silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mmgen.diffusion.guidance import Guidance
from mmgen.diffusion.samplers import SAMPLERS

MAX_SEED = 2**32 - 1  # seeds are integers in [0, MAX_SEED]; row i of a batch uses seed + i
TEXT_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "max_images")


@dataclass
class GenerationOptions:
    """Sampling settings.

    Text: temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off; `max_images` images per
    row before <boi> is no longer allowed.
    Images (each interface takes its share; see its `Options`): `sampler` (see SAMPLERS) walks
    `schedule` ("uniform" in the model's time, "karras", or a list of σs) in `image_steps` steps
    (None: the interface's default: 25 in the backbone, the MLP head's `steps` per token); `shift` is
    the flow shift of "uniform" ("auto": from the token count); `eta` the noise of the stochastic
    samplers (None: the sampler's default), drawn from a per-row Brownian tree or i.i.d. (`noise`);
    `guidance` a CFG scale or a full `Guidance` (for codes: CFG on logits with its scale);
    `cache_threshold` τ of First Block Cache (0 = off). Codes are sampled with `image_temperature`
    and `image_top_k`; the MLP head scales its starting noise by `image_temperature` (MAR: 0.95
    without CFG).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_images: int = 1
    image_steps: int | None = None
    image_temperature: float = 1.0
    image_top_k: int = 0
    sampler: str = "euler"
    schedule: str | Sequence[float] = "uniform"
    shift: float | str = 1.0
    eta: float | None = None
    noise: str = "brownian"
    guidance: float | Guidance = 3.0
    cache_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling options: {self}")
        if self.image_temperature < 0 or self.image_top_k < 0 or (self.image_steps is not None and self.image_steps < 1):
            raise ValueError(f"invalid image sampling options: {self}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {sorted(SAMPLERS)}")
        if isinstance(self.shift, str) and self.shift != "auto":
            raise ValueError(f"shift must be a number or 'auto', got {self.shift!r}")
        if self.noise not in ("brownian", "iid"):
            raise ValueError(f"noise must be 'brownian' or 'iid', got {self.noise!r}")
        if self.cache_threshold < 0:
            raise ValueError(f"cache_threshold must be >= 0, got {self.cache_threshold}")
        if not isinstance(self.guidance, Guidance):
            self.guidance = Guidance(scale=float(self.guidance))

    def image_options(self, options_class: type, interface: str):
        """This call's image options as `options_class` (a dataclass whose fields are a subset of the
        image fields); raises ValueError naming every image option that is set but not in it."""
        accepted = [f.name for f in dataclasses.fields(options_class)]
        stray = [n for n in IMAGE_OPTIONS if n not in accepted and getattr(self, n) != getattr(DEFAULTS, n)]
        if stray:
            raise ValueError(f"option(s) {', '.join(stray)} do not apply to the {interface!r} image interface, which "
                             f"takes {', '.join(accepted)}; leave the others at their defaults")
        return options_class(**{n: getattr(self, n) for n in accepted})


IMAGE_OPTIONS = tuple(f.name for f in dataclasses.fields(GenerationOptions) if f.name not in TEXT_OPTIONS)
DEFAULTS = GenerationOptions()


def sample_token(logits: Tensor, generators: Sequence[torch.Generator], temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Pick one token per row from logits (B, V) -> (B,), each row with its own generator.

    temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0))
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])
