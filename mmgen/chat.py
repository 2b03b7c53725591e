"""Chat: role/content messages with text and images in, the assistant's turn (text and images) out.

    from mmgen.chat import Chat
    chat = Chat.from_pretrained()                       # the bundled model; or a directory from `mmgen train`
    reply = chat([{"role": "user", "content": "draw a red circle"}])
    # ['here is a red circle in the center.', <PIL.Image.Image 16x16>]
    for event in chat.stream(messages): ...             # TextDelta / ImageStart / ImageStep / ImageDone / Done
    edited = chat.edit("circle.png", "make the circle blue")  # .image (PIL), .text ("here is a blue circle ...")

Messages follow `mmgen.chat_template` (images in any accepted form; user text cannot inject special
tokens). Options are `GenerationOptions` fields (max_new_tokens, temperature, top_p, top_k,
guidance, sampler, image_steps, …) plus `seed`, `image` ("auto": the model decides, "always":
the answer starts with an image, "never": text only), `size` (checked against the model's image
size) and `scale` (nearest-neighbour upscaling of returned images, 1 to MAX_UPSCALE).
Best-of-N (`best_of=N`, `chat(...)` and `batch(...)` only): each conversation is answered N times in one
batch (answer k with seed + i·N + k); the answer kept is the one whose drawn images give the last user
message's text the highest log-likelihood (`mmgen.scoring`; a reply without an image scores -inf, and
the first answer is kept when none drew one). Its images carry the scores in `PIL.Image.info`:
`mmgen_score` (its own), `mmgen_scores` (every candidate's, in seed order) and `mmgen_seed`.
Errors are raised before any work: a bad option (any of those) raises `OptionError` naming it, its
value and what is allowed; a conversation or image the template cannot take raises `ChatError`.
Both are `MMGenError`s and `ValueError`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmgen import events
from mmgen.assets import BUNDLED, model_directory
from mmgen.chat_template import Message, parse_messages, render
from mmgen.errors import ChatError, OptionError, check_choice, check_number
from mmgen.files import CONFIG_FILE
from mmgen.generation import GenerationOptions
from mmgen.pipeline import Pipeline, to_pil
from mmgen.sampling import MAX_SEED
from mmgen.scoring import score_images
from mmgen.tokenizers.image import ImageTokens

IMAGE_MODES = ("auto", "always", "never")
MAX_UPSCALE = 64  # `scale` of returned images: 1 (none) to 64×


@dataclass
class TextDelta:
    text: str
    type: str = "text"


@dataclass
class ImageStart:
    index: int  # the image's place among this turn's images
    type: str = "image_start"


@dataclass
class ImageStep:
    step: int  # 1-based
    steps: int
    preview: Image.Image | None = None  # the current estimate of the clean image (diffusion interfaces)
    type: str = "image_step"


@dataclass
class ImageDone:
    image: Image.Image
    type: str = "image_done"


@dataclass
class Done:
    parts: list = field(default_factory=list)  # the whole turn, as `Chat.__call__` returns it
    type: str = "done"


@dataclass
class Edited:
    """What `Chat.edit` returns: the drawn image and the text of the answer (the model's name for it)."""

    image: Image.Image
    text: str


class Chat:
    """A model with its tokenizer behind a chat interface.

    Args:
        pipeline: a loaded `Pipeline` (see `from_pretrained`).
        defaults: generation defaults (greedy text, guidance 3); per-call options override them.
    """

    def __init__(self, pipeline: Pipeline, defaults: GenerationOptions | None = None):
        self.pipe = pipeline
        self.tokenizer, self.model = pipeline.tokenizer, pipeline.model
        self.defaults = defaults or GenerationOptions(max_new_tokens=48, temperature=0.0, max_images=1)

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None) -> Chat:
        """Load a model directory (`config.json`, `model.safetensors`, `tokenizer.model`) or a bundled model by name
        ("chat-tiny", "edit-tiny": `mmgen.assets.BUNDLED`); None: chat-tiny.
        `dtype` casts the weights ("bf16", "fp16", "fp32"; None: as stored; an unknown name is an OptionError)."""
        d = model_directory(directory)
        if not (d / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a model directory (no config.json); give the output directory of "
                                    f"`mmgen train`, a bundled model's name ({', '.join(BUNDLED)}), or no path for "
                                    "the bundled default")
        return cls(Pipeline.from_pretrained(d, device, dtype))

    @property
    def image_size(self) -> int:
        return self.model.config.image.resolution

    # -- options and prompts -----------------------------------------------------------------------

    def options(self, image: str = "auto", size: int | None = None, **overrides: Any) -> tuple[GenerationOptions, bool]:
        """(GenerationOptions, force_image) from the defaults and per-call overrides, checked against the
        model's image interface too; raises OptionError naming the option."""
        check_choice("image", image, IMAGE_MODES)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size != self.image_size):
            raise OptionError(f"size = {size!r:.40}: this model draws {self.image_size}×{self.image_size} images "
                              "(its image interface has a fixed size); drop size=, or use scale= to upscale the "
                              "returned images")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(GenerationOptions)}
        if unknown:
            raise OptionError(f"unknown option(s) {sorted(unknown)}; options are the fields of GenerationOptions plus "
                              "seed, image, size and scale")
        opts = dataclasses.replace(self.defaults, **overrides)
        if image == "never":
            opts = dataclasses.replace(opts, max_images=0)
        elif image == "always":
            opts = dataclasses.replace(opts, max_images=max(1, opts.max_images))
        self.model.image.options(opts)  # an image option the model's interface does not take
        return opts, image == "always"

    @staticmethod
    def check_seed_and_scale(seed: Any, scale: Any, rows: int = 1) -> None:
        """Raise OptionError unless `seed` is an integer whose `rows` seeds (seed + i) lie in [0, MAX_SEED]
        and `scale` an integer in [1, MAX_UPSCALE]."""
        check_number("seed", seed, low=0, high=MAX_SEED - (rows - 1), integer=True)
        check_number("scale", scale, low=1, high=MAX_UPSCALE, integer=True)

    def prompt(self, messages: Sequence[Any]) -> list:
        """Messages -> the rendered prompt (segments), ending with `<|assistant|>`; raises ChatError."""
        parsed = parse_messages(messages)
        try:
            sample = render(parsed, self.tokenizer, self.pipe.image)
        except ValueError as e:  # an unreadable image, or one of an unsupported type, mode or size
            raise ChatError(str(e)) from None
        per_image = self.model.config.image.tokens_per_image + 2  # <boi> slots <eoi>
        n = 1 + sum(len(self.tokenizer.encode(s)) if isinstance(s, str) else len(s) if isinstance(s, list)
                    else per_image for s in sample)
        room = self.model.config.backbone.max_position_embeddings
        if n >= room:
            raise ChatError(f"the conversation is {n} tokens long and the model holds {room}, with room left to "
                            "answer: drop earlier messages (/reset in `mmgen chat`) or shorten the message")
        return sample

    # -- generation --------------------------------------------------------------------------------

    def __call__(self, messages: Sequence[Any], *, seed: int = 0, image: str = "auto", size: int | None = None,
                 scale: int = 1, **options: Any) -> list:
        """The assistant's turn for one conversation: an ordered list of text strings and PIL images."""
        return self.batch([messages], seed=seed, image=image, size=size, scale=scale, **options)[0]

    def batch(self, conversations: Sequence[Sequence[Any]], *, seed: int = 0, image: str = "auto",
              size: int | None = None, scale: int = 1, **options: Any) -> list[list]:
        """Answer several conversations at once; conversation i uses seed + i (its answer does not
        depend on the others)."""
        return self._generate(conversations, seed, image, size, scale, options)

    def edit(self, image: Any, instruction: str, /, *, seed: int = 0, scale: int = 1, **options: Any) -> Edited:
        """Draw `image` changed as `instruction` says ("make the circle blue"): one user message [image,
        instruction], answered as the model was trained to answer edits (`mmgen.data.edits`: it names the
        result, then draws it). Returns the drawn image and the answer's text. Raises ChatError for a
        missing or second image, an empty instruction, or an answer without an image (a model not trained
        to edit); best_of does not apply (it scores images against the instruction, not the result)."""
        if image is None or isinstance(image, str) and not image.strip():
            raise ChatError("an edit needs the image to change: give one image (a path, PIL image, array or tensor)")
        if isinstance(image, (list, tuple)):
            raise ChatError(f"an edit changes one image, got {len(image)}: give one image (edit each image "
                            "separately)")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ChatError(f"an edit needs an instruction that says what to change, e.g. 'make the circle blue'; "
                            f"got {instruction!r:.60}")
        if options.get("best_of", 1) != 1:
            raise OptionError(f"best_of = {options['best_of']!r:.20}: an edit is drawn once (best-of-N scores images "
                              "against the prompt, and an edit's prompt is the instruction, not the result)")
        parts = self([{"role": "user", "content": [image, instruction]}], seed=seed, scale=scale, **options)
        drawn = [p for p in parts if isinstance(p, Image.Image)]
        text = " ".join(p for p in parts if isinstance(p, str))
        if not drawn:
            raise ChatError(f"the model answered without an image ({text!r:.120}): it may not be trained to edit "
                            "(the bundled model and models trained with an `edits` source are); rephrase the "
                            "instruction or try another seed")
        return Edited(drawn[0], text)

    def stream(self, messages: Sequence[Any], *, seed: int = 0, image: str = "auto", size: int | None = None,
               scale: int = 1, previews: bool = False, **options: Any) -> Iterator:
        """Events as the answer is written: `TextDelta`, `ImageStart`, `ImageStep` (with a preview PIL
        image when `previews`), `ImageDone`, and finally `Done` with the whole turn. Errors in the
        input raise before the first event. Leaving the loop early stops generation at its next event."""
        self.check_seed_and_scale(seed, scale)
        opts, force = self.options(image, size, **options)
        if opts.best_of > 1:
            raise OptionError(f"best_of = {opts.best_of} applies to chat(...) and chat.batch(...), which draw the "
                              "candidates together and return the best; stream shows one drawing as it happens: "
                              "leave best_of at 1 here")
        prompt = self.prompt(messages)
        ids: list[int] = []  # the text tokens since the last image
        text, images = "", 0
        try:
            for e in self.pipe.engine.stream([prompt], opts, seed=seed, force_image=force,
                                             stop=[self.tokenizer.end_id]):
                if isinstance(e, events.Token):
                    ids.append(e.id)
                    new = self.tokenizer.decode(ids)
                    if len(new) > len(text) and new.startswith(text):
                        yield TextDelta(new[len(text):])
                    text = new
                elif isinstance(e, events.ImageStart):
                    ids, text = [], ""
                    yield ImageStart(images)
                elif isinstance(e, events.ImageStep):
                    yield ImageStep(e.step, e.steps, self._preview(e.denoised, scale) if previews else None)
                elif isinstance(e, events.ImageDone):
                    images += 1
                    yield ImageDone(to_pil(e.image, scale))
                elif isinstance(e, events.Done):
                    yield Done(self._parts(e.outputs, scale)[0])
        except OptionError:
            raise
        except ValueError as e:  # e.g. no room left in the context for a forced image
            raise ChatError(str(e)) from None

    def _preview(self, denoised, scale: int) -> Image.Image | None:
        """The current clean estimate (1, c, G, G) as a PIL image, for interfaces that have one."""
        if denoised is None:
            return None
        latents = denoised[:1].to(self.model.dtype)
        return to_pil(self.model.decode_images(ImageTokens(latents=latents))[0], scale)

    def _generate(self, conversations, seed, image, size, scale, options) -> list[list]:
        if isinstance(conversations, (str, dict)) or not isinstance(conversations, Sequence) or not conversations:
            raise ChatError("give a non-empty list of conversations (each a list of messages)")
        opts, force = self.options(image, size, **options)
        self.check_seed_and_scale(seed, scale, len(conversations) * opts.best_of)
        prompts = [self.prompt(c) for c in conversations]
        n = opts.best_of
        try:
            rows = self.pipe.engine.generate([p for p in prompts for _ in range(n)],
                                             dataclasses.replace(opts, best_of=1), seed=seed,
                                             force_image=force, stop=[self.tokenizer.end_id])
        except OptionError:
            raise
        except ValueError as e:  # e.g. no room left in the context for a forced image
            raise ChatError(str(e)) from None
        if n == 1:
            return self._parts(rows, scale)
        texts = [parse_messages(c)[-1].text for c in conversations]
        return [self._best(rows[i * n:(i + 1) * n], texts[i], seed + i * n, scale) for i in range(len(prompts))]

    def _best(self, candidates: list[list], text: str, first_seed: int, scale: int) -> list:
        """The candidate answer whose images score best for `text` (the mean over its images; -inf without
        one), as parts, its images carrying the scores in `info`."""
        drawn = [[seg for seg in row if isinstance(seg, torch.Tensor)] for row in candidates]
        if not any(drawn):
            return self._parts(candidates[:1], scale)[0]
        flat = torch.stack([im for row in drawn for im in row])  # (M, C, H, W), every candidate's images
        totals, scores, at = score_images(self.model, self.pipe.builder, flat, text).total.tolist(), [], 0
        for row in drawn:
            scores.append(sum(totals[at:at + len(row)]) / len(row) if row else float("-inf"))
            at += len(row)
        best = max(range(len(candidates)), key=scores.__getitem__)
        parts = self._parts([candidates[best]], scale)[0]
        for part in parts:
            if isinstance(part, Image.Image):
                part.info.update(mmgen_score=scores[best], mmgen_scores=scores, mmgen_seed=first_seed + best)
        return parts

    def _parts(self, rows: list[list], scale: int) -> list[list]:
        """Engine outputs (token-id lists and image tensors per row) -> text strings and PIL images."""
        out = []
        for row in rows:
            parts = []
            for seg in row:
                if isinstance(seg, list):
                    text = self.tokenizer.decode(seg).strip()
                    if text:
                        parts.append(text)
                else:
                    parts.append(to_pil(seg, scale))
            out.append(parts)
        return out


__all__ = ["Chat", "ChatError", "Done", "Edited", "ImageDone", "ImageStart", "ImageStep", "Message", "OptionError", "TextDelta"]
