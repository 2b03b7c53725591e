"""Where strings and pictures meet ids and tensors: load a model directory, draw from captions,
caption images. The engine below works on ids only; this layer owns the tokenizer and image I/O."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from mmgen.data.images import ImageInput, load_image
from mmgen.events import Done, ImageStep
from mmgen.generation import Engine, GenerationOptions
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBuilder
from mmgen.tokenizers.text import TextTokenizer


def to_pil(image: Tensor, scale: int = 1) -> Image.Image:
    """(C, H, W) in [-1, 1] -> PIL image, optionally upscaled `scale`× with nearest neighbours."""
    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST) if scale > 1 else pil


class Pipeline:
    """A model with its tokenizer: `draw` images from captions, `caption` images."""

    def __init__(self, model: MMGenModel, tokenizer: TextTokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        c = model.config
        self.builder = SequenceBuilder(
            tokenizer, c.image.channels, c.image.resolution, c.image.tokens_per_image,
            c.backbone.max_position_embeddings,
        )
        self.engine = Engine(model, self.builder)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Pipeline:
        return cls(MMGenModel.from_pretrained(directory, device), TextTokenizer.load(directory))

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
        """One image (C, H, W) in [-1, 1] per prompt; `progress` sees each drawing step's `ImageStep` event."""
        opts = dataclasses.replace(options or GenerationOptions(), max_new_tokens=1, max_images=1)
        for event in self.engine.stream([[p] for p in prompts], opts, seed=seed, force_image=True):
            if isinstance(event, ImageStep) and progress is not None:
                progress(event)
            elif isinstance(event, Done):
                return [row[0] for row in event.outputs]

    def caption(self, images: Sequence[ImageInput], options: GenerationOptions | None = None, seed: int = 0) -> list[str]:
        """A caption per image (greedy by default)."""
        opts = dataclasses.replace(options or GenerationOptions(max_new_tokens=24, temperature=0), max_images=0)
        rows = self.engine.generate([[self.image(im)] for im in images], opts, seed=seed)
        return [" ".join(self.tokenizer.decode(s) for s in row if isinstance(s, list)).strip() for row in rows]
