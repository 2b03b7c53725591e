"""Where strings and pictures meet ids and tensors: load a model directory, draw from captions,
caption images. The engine below works on ids only; this layer owns the tokenizer and image I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mmgen.chat_template import check_text
from mmgen.data.images import ImageInput, load_image
from mmgen.errors import InputError, ModelFileError
from mmgen.events import Done, ImageStep
from mmgen.files import CONFIG_FILE, TOKENIZER_DIGEST, WEIGHTS_FILE, read_weights_metadata
from mmgen.generation import Engine, GenerationOptions
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBuilder
from mmgen.tokenizers.text_contract import TextTokenizerContract, load_text_tokenizer


def to_pil(image: Tensor, scale: int = 1) -> Image.Image:
    """(C, H, W) in [-1, 1] -> PIL image, optionally upscaled `scale`× with nearest neighbours."""
    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST) if scale > 1 else pil


def _batch(items: Any, noun: str, method: str) -> list:
    """`items` as a non-empty list; an InputError for nothing, or for a single item where a list belongs."""
    single = isinstance(items, (str, bytes, Path, Image.Image)) or (isinstance(items, Tensor) and items.dim() != 4)
    if single or not isinstance(items, Iterable):
        raise InputError(f"Pipeline.{method} takes a list of {noun}s, got {type(items).__name__}; for one {noun}, "
                         f"pass a list of it: Pipeline.{method}([{noun}])")
    items = list(items)
    if not items:
        raise InputError(f"Pipeline.{method} got an empty list: give at least one {noun}")
    return items


def check_pair(directory: Path, tokenizer: TextTokenizerContract, vocab: int) -> None:
    """Raise ModelFileError unless `tokenizer` is the one saved with the weights in `directory`: its
    digest (`tokenizer.digest()`, the SHA-256 of its files) equals the one their header records; for
    weights saved without a record, its size equals the model's `backbone.vocab_size`. Another model's
    tokenizer would turn prompts into other words."""
    recorded = read_weights_metadata(directory / WEIGHTS_FILE).get(TOKENIZER_DIGEST)
    names = " + ".join(str(directory / name) for name in tokenizer.files())
    fix = (f"copy the tokenizer files saved with these weights (from the training run's output directory) into "
           f"{directory}")
    if recorded is not None and recorded != tokenizer.digest():
        raise ModelFileError(f"{names} is not the tokenizer {directory / WEIGHTS_FILE} was "
                             f"saved with (their SHA-256 differ; it has {len(tokenizer)} pieces, the model's "
                             f"vocabulary {vocab}); {fix}")
    if recorded is None and len(tokenizer) != vocab:
        raise ModelFileError(f"{names} has {len(tokenizer)} pieces but {directory / CONFIG_FILE} "
                             f"gives backbone.vocab_size = {vocab}: the tokenizer does not belong to this model; {fix}")


class Pipeline:
    """A model with its tokenizer: `draw` images from captions, `caption` images.

    Raises:
        ModelFileError: the tokenizer has more pieces than the model's vocabulary (`backbone.vocab_size`):
            it is not the model's (its ids past the vocabulary have no embedding).
    """

    def __init__(self, model: MMGenModel, tokenizer: TextTokenizerContract):
        vocab = model.config.backbone.vocab_size
        if len(tokenizer) > vocab:
            raise ModelFileError(f"the text tokenizer has {len(tokenizer)} pieces but the model's vocabulary "
                                 f"(backbone.vocab_size) has {vocab}: it is not this model's tokenizer; pair the "
                                 "model with the tokenizer it was trained with")
        self.model, self.tokenizer = model.eval(), tokenizer
        c = model.config
        self.builder = SequenceBuilder(
            tokenizer, c.image.channels, c.image.resolution, c.image.tokens_per_image,
            c.backbone.max_position_embeddings,
        )
        self.engine = Engine(model, self.builder)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None) -> Pipeline:
        """The model and text tokenizer saved in `directory`, each file checked (see `MMGenModel.from_pretrained`,
        `load_text_tokenizer`), and checked to belong together (`check_pair`); the weights cast to `dtype`
        ("bf16", "fp16", "fp32"; None: as stored)."""
        model, tokenizer = MMGenModel.from_pretrained(directory, device, dtype), load_text_tokenizer(directory)
        check_pair(Path(directory), tokenizer, model.config.backbone.vocab_size)
        return cls(model, tokenizer)

    def image(self, image: ImageInput) -> Tensor:
        """A path, PIL image, uint8 array (H, W[, C]) or float tensor (C, H, W) in [-1, 1] -> the model's
        (C, R, R) in [-1, 1], through the same conversion as the training data (`load_image`); raises
        `UnreadableImage` (a ValueError) naming the problem."""
        c = self.model.config.image
        return load_image(image, c.channels, c.resolution)

    def draw(
        self, prompts: Sequence[str], options: GenerationOptions | None = None, seed: int = 0,
        progress: Callable[[ImageStep], None] | None = None,
    ) -> list[Tensor]:
        """One image (C, H, W) in [-1, 1] per prompt; `progress` sees each drawing step's `ImageStep` event.
        An empty list, a single string instead of a list, or a prompt that is not valid text raises InputError."""
        prompts = _batch(prompts, "prompt", "draw")
        for i, p in enumerate(prompts):
            check_text(p, f"prompt {i}")  # a str encodable as UTF-8, or an InputError naming it
        opts = dataclasses.replace(options or GenerationOptions(), max_new_tokens=1, max_images=1)
        for event in self.engine.stream([[p] for p in prompts], opts, seed=seed, force_image=True):
            if isinstance(event, ImageStep) and progress is not None:
                progress(event)
            elif isinstance(event, Done):
                return [row[0] for row in event.outputs]

    def caption(self, images: Sequence[ImageInput], options: GenerationOptions | None = None,
                seed: int = 0) -> list[str]:
        """A caption per image (greedy by default); an empty list, or a single image instead of a list (a
        (N, C, H, W) tensor is a list of N images), raises InputError."""
        images = _batch(images, "image", "caption")
        opts = dataclasses.replace(options or GenerationOptions(max_new_tokens=24, temperature=0), max_images=0)
        rows = self.engine.generate([[self.image(im)] for im in images], opts, seed=seed)
        return [" ".join(self.tokenizer.decode(s) for s in row if isinstance(s, list)).strip() for row in rows]
