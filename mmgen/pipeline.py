"""Where strings and pictures meet ids and tensors: load a model directory, draw from captions,
caption images, score images against a text. The engine below works on ids only; this layer owns the
tokenizer and image I/O. Best-of-N is drawn here: the candidates are just more rows of one engine call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mmgen.chat_template import check_text
from mmgen.data.images import ImageInput, load_image
from mmgen.errors import InputError, ModelFileError, OptionError, check_number
from mmgen.events import Done, ImageStep
from mmgen.files import CONFIG_FILE, TOKENIZER_DIGEST, WEIGHTS_FILE, read_weights_metadata
from mmgen.generation import Engine, GenerationOptions
from mmgen.model import MMGenModel
from mmgen.sampling import MAX_SEED
from mmgen.scoring import Scores, score_images
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


CANDIDATE_ROWS = 64  # rows `draw_best` draws per engine call by default; more candidates are drawn in turns


@dataclass
class BestOf:
    """One prompt's best-of-N drawing.

    image:      (C, H, W) in [-1, 1], the candidate whose image gives the prompt the highest score.
    index:      its place among the candidates (its seed is seeds[index]).
    scores:     (N,) log p(prompt <eos> | candidate), summed over the tokens (`mmgen.scoring`).
    per_token:  (N,) the same per scored token.
    candidates: (N, C, H, W) every candidate, in seed order.
    seeds:      the N seeds; drawing the prompt alone with seeds[k] gives candidates[k].
    """

    image: Tensor
    index: int
    scores: Tensor
    per_token: Tensor
    candidates: Tensor
    seeds: list[int]


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
        """One image (C, H, W) in [-1, 1] per prompt, prompt i drawn with seed + i; `progress` sees each
        drawing step's `ImageStep` event. With `options.best_of` N > 1 each image is the best of N
        candidates (`draw_best`, whose seeds these are). An empty list, a single string instead of a
        list, or a prompt that is not valid text raises InputError."""
        prompts = self._prompts(prompts, "draw")
        opts = options or GenerationOptions()
        if opts.best_of > 1:
            return [b.image for b in self.draw_best(prompts, opts, seed, progress)]
        return self._draw_rows(prompts, opts, seed, progress)

    def draw_best(
        self, prompts: Sequence[str], options: GenerationOptions | None = None, seed: int = 0,
        progress: Callable[[ImageStep], None] | None = None, rows_per_call: int = CANDIDATE_ROWS,
    ) -> list[BestOf]:
        """Best-of-N: `options.best_of` = N candidates per prompt, candidate k of prompt i drawn with seed
        seed + i·N + k (so N = 1 is `draw`), scored by the model's log-likelihood of the prompt given the
        image (`mmgen.scoring`); the best is kept. Rows are drawn `rows_per_call` at a time (a row's image
        does not depend on the others in its batch).

        Raises:
            InputError: as `draw`.
            OptionError: a seed range past MAX_SEED, a bad `rows_per_call`, or candidates that do not fit
                in device memory (the message gives the numbers and what to lower).
        """
        prompts = self._prompts(prompts, "draw_best")
        opts = options or GenerationOptions()
        n = opts.best_of
        rows = [p for p in prompts for _ in range(n)]  # prompt i, candidate k -> row i·N + k
        check_number("seed", seed, low=0, high=MAX_SEED - (len(rows) - 1), integer=True)
        check_number("rows_per_call", rows_per_call, low=1, integer=True)
        seeds = [seed + r for r in range(len(rows))]
        images, scores = [], []  # per row: (C, H, W); per call: Scores
        for start in range(0, len(rows), rows_per_call):
            chunk = slice(start, start + rows_per_call)
            try:
                images += self._draw_rows(rows[chunk], opts, seeds[chunk], progress)
                scores.append(score_images(self.model, self.builder, torch.stack(images[chunk]), rows[chunk]))
            except torch.OutOfMemoryError:
                raise OptionError(
                    f"{len(prompts)} prompt(s) × best_of {n} = {len(rows)} candidates, drawn {rows_per_call} rows "
                    f"at a time, do not fit in the memory of {self.model.device}: lower rows_per_call "
                    "(Pipeline.draw_best(..., rows_per_call=...)), best_of or the number of prompts") from None
        total = torch.cat([s.total for s in scores]).view(len(prompts), n)  # (P·N,) -> (P, N)
        per_token = torch.cat([s.per_token for s in scores]).view(len(prompts), n)  # (P, N)
        out = []
        for i in range(len(prompts)):
            candidates = torch.stack(images[i * n:(i + 1) * n])  # N × (C, H, W) -> (N, C, H, W)
            best = int(total[i].argmax())
            out.append(BestOf(candidates[best], best, total[i], per_token[i], candidates, seeds[i * n:(i + 1) * n]))
        return out

    def score(self, images: Sequence[ImageInput], text: str) -> Scores:
        """The model's log-likelihood of `text` given each image (`mmgen.scoring.score_images`); images in any
        form `image` takes (a (N, C, H, W) tensor is a list of N images). Raises InputError as `caption`."""
        images = _batch(images, "image", "score")
        check_text(text, "the text to score")
        return score_images(self.model, self.builder, torch.stack([self.image(im) for im in images]), text)

    def _prompts(self, prompts: Sequence[str], method: str) -> list[str]:
        """`prompts` as a non-empty list of valid texts, or an InputError naming the problem."""
        prompts = _batch(prompts, "prompt", method)
        for i, p in enumerate(prompts):
            check_text(p, f"prompt {i}")  # a str encodable as UTF-8, or an InputError naming it
        return prompts

    def _draw_rows(self, prompts: list[str], opts: GenerationOptions, seed: int | list[int],
                   progress: Callable[[ImageStep], None] | None) -> list[Tensor]:
        """One image per prompt in one engine call (seed: a base, or one per row)."""
        opts = dataclasses.replace(opts, max_new_tokens=1, max_images=1, best_of=1)  # candidates are rows here
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
