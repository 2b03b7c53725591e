"""The model behind the API: validated requests become engine jobs for the batcher.

`Service` holds the loaded `Chat` and the `Batcher`. Turning a request into jobs decodes its images,
renders the conversation with the chat template and checks options and prompt length; it runs in
a thread (never on the event loop), and every problem in the input comes out as an `APIError`: the
library's own errors (`mmgen.errors.MMGenError`, ValueErrors: bad options, unreadable images, a
conversation the template refuses) are mapped to 400 by type.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmgen.chat import Chat
from mmgen.errors import MMGenError
from mmgen.events import ImageDone
from mmgen.files import load_device
from mmgen.pipeline import to_pil
from mmgen.sampling import MAX_SEED
from mmgen.serve import images
from mmgen.serve.batcher import Batcher, Job
from mmgen.serve.config import ServeConfig
from mmgen.serve.protocol import APIError, ChatRequest, ImageRef, ImagesRequest


@dataclass
class Work:
    """A request's jobs (one per choice, in order) and its prompt length in tokens (per choice)."""

    jobs: list[Job]
    prompt_tokens: int


class Service:
    """Args:
        chat: the loaded model (`Chat.from_pretrained`).
        config: the server settings.
    """

    def __init__(self, chat: Chat, config: ServeConfig):
        self.chat, self.config = chat, config
        self.model_id = config.model_name or (config.model.resolve().name if config.model else "chat-tiny")
        self.tokenizer = chat.tokenizer
        image = chat.model.config.image
        self.image_size = image.resolution
        self.image_tokens = image.tokens_per_image + 2  # <boi> tokens <eoi>
        self.max_positions = chat.model.config.backbone.max_position_embeddings
        self.batcher = Batcher(chat.pipe.engine, [self.tokenizer.end_id], config.batch_window_ms / 1000,
                               config.max_batch, config.max_queue)

    @classmethod
    def load(cls, config: ServeConfig) -> Service:
        return cls(Chat.from_pretrained(config.model, load_device(config.device), config.dtype), config)

    def chat_work(self, req: ChatRequest, deliver: Callable[[int, Any], None]) -> Work:
        """Jobs for a chat request; `deliver(choice, event)` receives each choice's events."""
        messages = [{"role": m["role"], "content": [self._image(p) if isinstance(p, ImageRef) else p
                                                    for p in m["parts"]]} for m in req.messages]
        opts, force = _library_call(lambda: self.chat.options(req.image, **req.options))
        prompt = _library_call(lambda: self.chat.prompt(messages))
        n = self.prompt_tokens(prompt)
        if force and n + self.image_tokens > self.max_positions:
            raise APIError(400, f"the conversation is {n} tokens long: an image needs {self.image_tokens} more and the "
                                f"model holds {self.max_positions}; drop earlier messages", "messages",
                           "context_length_exceeded")
        return Work(self._jobs(prompt, opts, force, req.n, req.seed, deliver), n)

    def images_work(self, req: ImagesRequest, deliver: Callable[[int, Any], None]) -> Work:
        """Jobs for an images request: the prompt as a caption, the answer forced to start with an image."""
        overrides = {**req.options, "max_new_tokens": 1, "max_images": 1}
        opts, _ = _library_call(lambda: self.chat.options("always", **overrides))
        prompt = [req.prompt]
        n = self.prompt_tokens(prompt)
        if n + self.image_tokens > self.max_positions:
            raise APIError(400, f"the prompt is {n} tokens long: an image needs {self.image_tokens} more and the model "
                                f"holds {self.max_positions}; shorten it", "prompt", "context_length_exceeded")
        return Work(self._jobs(prompt, opts, True, req.n, req.seed, deliver), n)

    def prompt_tokens(self, prompt: list) -> int:
        """Positions a rendered prompt takes: <bos>, its text and id segments, each image's positions."""
        return 1 + sum(len(self.tokenizer.encode(s)) if isinstance(s, str) else len(s) if isinstance(s, list)
                       else self.image_tokens for s in prompt)

    def _jobs(self, prompt, opts, force, n, seed, deliver) -> list[Job]:
        base = secrets.randbelow(MAX_SEED - n + 2) if seed is None else seed  # choice i uses base + i
        return [Job(prompt, opts, base + i, force, _on_worker(i, deliver)) for i in range(n)]

    def _image(self, ref: ImageRef) -> Any:
        """An image part -> the model's (C, R, R) tensor, decoded like any image (`Pipeline.image`)."""
        source = images.decode(ref, self.config.allow_local_files, self.config.max_image_pixels)
        return _library_call(lambda: self.chat.pipe.image(source))


def _library_call(call: Callable[[], Any]) -> Any:
    """Run `call`; the library's errors about the input (MMGenError, ValueError, TypeError) -> 400."""
    try:
        return call()
    except (MMGenError, ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None


def _on_worker(choice: int, deliver: Callable[[int, Any], None]) -> Callable[[Any], None]:
    """A job's `deliver` (called on the worker thread): images become PIL there, so tensor work stays off
    the event loop."""
    def put(event: Any) -> None:
        if isinstance(event, ImageDone):
            event = ImageDone(event.row, to_pil(event.image))
        deliver(choice, event)
    return put


def loop_deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[int, Any], None]:
    """`deliver` that puts (choice, event) on an asyncio queue from any thread; silent once the loop is closed."""
    def deliver(choice: int, event: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (choice, event))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
    return deliver
