"""Sampling settings of a generation call, and the token sampler that text and codes share.

`GenerationOptions` is the one flat set of options users pass (Python, CLI, chat), each field checked
against its documented range when it is made (at most MAX_STEPS denoising steps). The text fields
belong to the engine; the image fields (`IMAGE_OPTIONS`) are handed to the image interface, which
takes the subset it understands as its own typed dataclass (`ImageInterface.options`) and rejects
the others when they are set, so no option is silently ignored. `best_of` (CALLER_OPTIONS) belongs
to the callers above the engine, which draw that many candidates per image and keep the one the model
scores best (`Pipeline.draw_best`, `Chat`, `mmgen generate --best-of`); the engine draws rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mmgen.diffusion.guidance import MAX_SCALE, Guidance
from mmgen.diffusion.samplers import SAMPLERS
from mmgen.diffusion.schedules import MAX_STEPS, check_schedule
from mmgen.errors import OptionError, check_choice, check_number

MAX_SEED = 2**32 - 1  # seeds are integers in [0, MAX_SEED]; row i of a batch uses seed + i
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # below: greedy up to rounding (give 0); above: uniform noise
MIN_SHIFT, MAX_SHIFT = 0.01, 100.0  # flow shifts in use lie within 0.3-10
MAX_BEST_OF = 64  # candidates per image: each is a full drawing, so N costs about N times the time
NOISES = ("brownian", "iid")
TEXT_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "max_images")
CALLER_OPTIONS = ("best_of",)
RANGES = {  # the plain numeric fields, as `check_number` bounds
    "max_new_tokens": dict(low=1, integer=True),
    "top_k": dict(low=0, integer=True),
    "top_p": dict(low=0, high=1, low_open=True),
    "min_p": dict(low=0, high=1, high_open=True),
    "max_images": dict(low=0, integer=True),
    "image_top_k": dict(low=0, integer=True),
    "cache_threshold": dict(low=0),
    "best_of": dict(low=1, high=MAX_BEST_OF, integer=True),
}


def _check(name: str, value: object, alternative: str, **bounds) -> None:
    """`check_number`, its message naming the `alternative` the field also takes."""
    try:
        check_number(name, value, **bounds)
    except OptionError as e:
        raise OptionError(f"{e}{alternative}") from None


def _check_temperature(name: str, value: object) -> None:
    """A temperature is 0 (greedy) or within [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    check_number(name, value, low=0, high=MAX_TEMPERATURE)
    if 0 < value < MIN_TEMPERATURE:
        raise OptionError(f"{name} = {value!r}: must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, "
                          f"{MAX_TEMPERATURE:g}]; below {MIN_TEMPERATURE:g} sampling is greedy up to rounding: give 0")


@dataclass
class GenerationOptions:
    """Sampling settings, each checked when the object is made: a value of the wrong type, not finite or
    out of range raises OptionError naming the field, the value and the allowed range.

    Text: `max_new_tokens` ≥ 1; `temperature` 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE];
    `top_k` ≥ 0, `top_p` in (0, 1] and `min_p` in [0, 1), off at 0, 1 and 0; `max_images` ≥ 0 images
    per row before <boi> is no longer allowed.
    Images (each interface takes its share; see its `Options`): `sampler` (one of SAMPLERS) walks
    `schedule` ("uniform" in the model's time, "karras", or a list of σs: see `check_schedule`) in
    `image_steps` steps, 1 to MAX_STEPS (None: the interface's default: 25 in the backbone, the MLP
    head's `steps` per token); `shift` in [MIN_SHIFT, MAX_SHIFT] is the flow shift of "uniform"
    ("auto": from the token count); `eta` ≥ 0 the noise of the stochastic samplers (None: the
    sampler's default), drawn from a per-row Brownian tree or i.i.d. (`noise`: one of NOISES);
    `guidance` a CFG scale in [0, MAX_SCALE] or a full `Guidance` (for codes: CFG on logits with its
    scale); `cache_threshold` τ ≥ 0 of First Block Cache (0 = off). Codes are sampled with
    `image_temperature` (the range of `temperature`) and `image_top_k` ≥ 0; the MLP head scales its
    starting noise by `image_temperature` (MAR: 0.95 without CFG).
    Best-of: `best_of` candidates, 1 to MAX_BEST_OF, per image a `Pipeline` or `Chat` draws, the one
    whose image gives the prompt the highest log-likelihood kept (`mmgen.scoring`); 1 is plain drawing.
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
    best_of: int = 1

    def __post_init__(self) -> None:
        for name, bounds in RANGES.items():
            check_number(name, getattr(self, name), **bounds)
        for name in ("temperature", "image_temperature"):
            _check_temperature(name, getattr(self, name))
        if self.image_steps is not None:
            _check("image_steps", self.image_steps, ", or None (the interface's default)", low=1, high=MAX_STEPS,
                   integer=True)
        check_choice("sampler", self.sampler, tuple(SAMPLERS))
        self.schedule = check_schedule(self.schedule)
        if not (isinstance(self.shift, str) and self.shift == "auto"):
            _check("shift", self.shift, ", or 'auto' (from the token count)", low=MIN_SHIFT, high=MAX_SHIFT)
        if self.eta is not None:
            _check("eta", self.eta, ", or None (the sampler's default)", low=0)
        check_choice("noise", self.noise, NOISES)
        if not isinstance(self.guidance, Guidance):
            _check("guidance", self.guidance, ", or a Guidance", low=0, high=MAX_SCALE)
            self.guidance = Guidance(scale=float(self.guidance))

    def image_options(self, options_class: type, interface: str):
        """This call's image options as `options_class` (a dataclass whose fields are a subset of the
        image fields); raises OptionError naming every image option that is set but not in it."""
        accepted = [f.name for f in dataclasses.fields(options_class)]
        stray = [n for n in IMAGE_OPTIONS if n not in accepted and getattr(self, n) != getattr(DEFAULTS, n)]
        if stray:
            raise OptionError(f"option(s) {', '.join(stray)} do not apply to the {interface!r} image interface, which "
                              f"takes {', '.join(accepted)}; leave the others at their defaults")
        return options_class(**{n: getattr(self, n) for n in accepted})


IMAGE_OPTIONS = tuple(f.name for f in dataclasses.fields(GenerationOptions)
                      if f.name not in TEXT_OPTIONS + CALLER_OPTIONS)
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
