"""The contract every image interface fulfils, and the request the engine hands it to draw.

An image interface decides how image tokens (`ImageTokens` from the frozen image tokenizer) meet
the backbone. It declares:
    name, causal            its registry name; whether image slots attend one after another
    Options                 the dataclass of image sampling options it takes (see `options`)
    check_config(image)     raises ValueError for an image config it cannot work with
and implements
    embed(tokens)                              clean tokens -> slot embeddings (N, L, D)
    train_inputs(tokens, conditions, generator) -> inputs (N, L, D), targets (anything)
    loss(targets, slots, prev, generator)      -> weighted per-image loss (N,), from the hidden states at
                                                  the slots (N, L, D) and at the positions that predict them,
                                                  i.e. <boi> and slots 0..L−2 (N, L, D)
    draw(request)                              a generator: yields `events.ImageStep` progress, returns the
                                                  drawn `ImageTokens` (what the engine commits to the cache)
and may hold
    understanding           None, or the module that embeds the images the model reads (prompt images,
                            drawn images in the clean pass) from pixels instead of `embed`
                            (`mmgen.interfaces.understanding`; the causal interfaces build it)
A new interface is one file with a subclass plus one line in `mmgen.interfaces.registry.INTERFACES`.

Layout: tokens are read in raster order. Codes (N, g, g) <-> (N, L); latents (N, c, G, G) <->
patches (N, L, c·p·p) with G = g·p.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from einops import rearrange
from torch import Tensor, nn

from mmgen.backbone import AttentionContext
from mmgen.config import ImageConfig, ModelConfig
from mmgen.events import ImageStep
from mmgen.kv_cache import KVCache, pad_and_stack
from mmgen.sampling import GenerationOptions
from mmgen.tokenizers.image import ImageTokens


class DrawingModel(Protocol):
    """What a draw uses of the model (`mmgen.model.MMGenModel`), named here so that the interfaces do
    not import the model that builds them."""

    model: nn.Module  # the backbone: model(x, ctx) and its layer runner

    def context(self, positions: Tensor, doc_id: Tensor, image_id: Tensor, cache: KVCache | None = None
                ) -> AttentionContext: ...

    def chunk_positions(self, start: Tensor, length: int, image: bool) -> Tensor: ...

    def extend(self, cache: KVCache, x: Tensor, active: Tensor, image: bool) -> Tensor: ...

    def encode_images(self, images: Tensor) -> ImageTokens: ...

    def decode_images(self, tokens: ImageTokens) -> Tensor: ...


Drawing = Generator[ImageStep, None, ImageTokens]


@dataclass
class DrawRequest:
    """One image to draw for each of R rows.

    model: the unified model (the backbone is run through `model.context` / `model.extend`).
    cache: the R rows' keys and values, each ending in <boi>; a copy the interface may extend.
    last: the hidden state at <boi> of each row (R, D).
    null_prefix: prefills the null prompt `<bos> <boi>` (the unconditional branch of guidance):
        returns its cache (1 row) and hidden state at <boi> (1, D).
    options: this interface's `Options`.
    generators: one per row; a row's draw depends only on its own generator and noise seed.
    noise_seeds: one per row and image, for noise that must not depend on the step count.
    step_cache: set by an interface that caches denoising steps, for its statistics.
    """

    model: DrawingModel
    cache: KVCache
    last: Tensor
    null_prefix: Callable[[], tuple[KVCache, Tensor]]
    options: Any
    generators: list[torch.Generator]
    noise_seeds: list[int]
    step_cache: Any = None

    @property
    def rows(self) -> int:
        return len(self.last)

    def with_null_rows(self) -> tuple[KVCache, Tensor]:
        """The rows' cache and <boi> hidden states followed by R copies of the null prompt's (2R rows)."""
        null_cache, null_last = self.null_prefix()
        r = self.rows
        return pad_and_stack([self.cache] + [null_cache] * r), torch.cat([self.last, null_last.expand(r, -1)])


class ImageInterface(nn.Module, ABC):
    """Base of the image interfaces; `config` is the whole model config (the backbone width and the
    diffusion settings are needed beside `config.image`)."""

    name: ClassVar[str]
    causal: ClassVar[bool]  # image slots are predicted one after another (causal attention inside images)
    Options: ClassVar[type]

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.check_config(config.image)
        self.cfg = config.image
        self.hidden_size = config.backbone.hidden_size
        self.understanding: nn.Module | None = None  # an instance attribute: a class one would hide the module

    @classmethod
    def check_config(cls, image: ImageConfig) -> None:
        """Raise ValueError, naming the field and the fix, if this interface cannot use `image`
        (subclasses call `check_understanding` for `image.understanding_input`)."""

    def options(self, options: GenerationOptions) -> Any:
        """This interface's `Options` from a call's options; raises OptionError for a set option it does not take."""
        return options.image_options(self.Options, self.name)

    def init_weights(self) -> None:
        """Called after the model's normal(0, 0.02) initialization of every Linear and Embedding."""

    @abstractmethod
    def embed(self, tokens: ImageTokens) -> Tensor:
        """Clean tokens of N images -> slot embeddings (N, L, D)."""

    @abstractmethod
    def train_inputs(self, tokens: ImageTokens, conditions: Tensor, generator: torch.Generator | None
                     ) -> tuple[Tensor, Any]:
        """Training inputs (N, L, D) and targets; `conditions` (N,) marks images that precede their text."""

    @abstractmethod
    def loss(self, targets: Any, slots: Tensor, prev: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Weighted per-image loss (N,) from the hidden states at the slots and at their predictors (N, L, D)."""

    @abstractmethod
    def draw(self, request: DrawRequest) -> Drawing:
        """Draw one image per row: yield `ImageStep` events, return the image tokens."""

    # -- layout helpers ---------------------------------------------------------------------------

    def patchify(self, latents: Tensor) -> Tensor:
        """(N, c, G, G) -> (N, L, c·p·p)."""
        p = self.cfg.patch_size
        return rearrange(latents, "n c (h p) (w q) -> n (h w) (c p q)", p=p, q=p)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(N, L, c·p·p) -> (N, c, G, G)."""
        p, g = self.cfg.patch_size, self.cfg.grid
        return rearrange(patches, "n (h w) (c p q) -> n c (h p) (w q)", h=g, w=g, p=p, q=p)


def require_tokenizer(interface: str, image: ImageConfig, discrete: bool, kind: str | None = None) -> None:
    """Raise unless `image.tokenizer` gives codes (`discrete`) or continuous latents, of `kind` if given."""
    if image.tokenizer.discrete != discrete:
        want = "a discrete (vq or hybrid)" if discrete else "a continuous (pixels, vae or diffusers)"
        raise ValueError(f"the {interface!r} interface needs {want} image tokenizer, got kind="
                         f"{image.tokenizer.kind!r}; set image.tokenizer (or model.image_tokenizer) accordingly")
    if kind is not None and image.tokenizer.kind != kind:
        raise ValueError(f"the {interface!r} interface needs a {kind!r} image tokenizer, got {image.tokenizer.kind!r}")
    if not discrete and image.code_input_noise:
        raise ValueError(f"image.code_input_noise = {image.code_input_noise}: the {interface!r} interface has no "
                         "input codes to corrupt; it applies to 'discrete' and 'hybrid': drop it")
