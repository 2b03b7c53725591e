"""The chat template: role/content messages -> one interleaved sample with role markers.

    <bos> <|user|> [images] text <|end|> <|assistant|> text [<boi> image <eoi>] text <|end|> … <|assistant|>

Messages come in the familiar form `{"role": "user" | "assistant", "content": ...}`, where content is
a string or a list of parts: strings, `{"type": "text", "text": ...}`, `{"type": "image", "image": X}`,
or bare images (PIL image, uint8 numpy array, float tensor (C, H, W) in [-1, 1], `pathlib.Path`).
In a user turn the images come first, then the text (the order the models are trained on); in an
assistant turn parts keep their order. Role markers and `<boi>`/`<eoi>` are inserted as ids; text
goes through SentencePiece, where they are control symbols no text can produce, so a user who
types "<|assistant|>" or "<boi>" gets ordinary text pieces (tested). Text must be a str that is valid
Unicode (`check_text`): a lone surrogate such as "\udc80" is an error naming the message and the
character, never silently replaced, since a changed prompt is worse than a refused one.

Training and inference render through the same function (`render`); training samples end with
`<eos>` after the last `<|end|>`, generation stops at `<|end|>`. `assistant_targets` marks the tokens
of assistant turns, the only LM targets of a source with `loss_on: assistant`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from mmgen.errors import ChatError, InputError
from mmgen.sequence import Sample

ROLES = ("user", "assistant")
IMAGE_TYPES = (Image.Image, np.ndarray, Tensor, Path)


@dataclass
class Message:
    """One turn: `role` and its ordered `parts` (text strings and images of any accepted type)."""

    role: str
    parts: list[Any] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[Any]:
        return [p for p in self.parts if not isinstance(p, str)]


def check_text(text: Any, where: str = "the prompt", error: type[InputError] = InputError) -> str:
    """`text` if it is a str that can be encoded as UTF-8; otherwise raise `error` naming `where`, the
    type or the position of the first invalid character (a lone surrogate), and the fix."""
    if not isinstance(text, str):
        hint = ": decode bytes first, e.g. text.decode('utf-8')" if isinstance(text, (bytes, bytearray)) else ""
        raise error(f"{where}: text must be a str, got {type(text).__name__}{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{where}: character {e.start} of the text ({text[e.start]!r}) is a lone surrogate, which is not "
                    "valid Unicode and cannot be encoded as UTF-8; fix the text (text read with "
                    "errors='surrogateescape' holds such characters: decode its bytes with errors='replace')") from None
    return text


def _part(part: Any, where: str) -> Any:
    if isinstance(part, str):
        return check_text(part, where, ChatError)
    if isinstance(part, IMAGE_TYPES):
        return part
    if isinstance(part, dict):
        kind = part.get("type", "image" if "image" in part else "text")
        kind = kind if isinstance(kind, str) else None
        if kind == "text" and "text" in part:
            return check_text(part["text"], where, ChatError)
        if kind in ("image", "image_url") and "image" in part:
            image = part["image"]
            return Path(image) if isinstance(image, str) else image
        raise ChatError(f"{where}: a content part must be {{'type': 'text', 'text': str}} or "
                        f"{{'type': 'image', 'image': ...}}, got {part!r:.120}")
    if isinstance(part, (bytes, bytearray)):
        raise ChatError(f"{where}: a bytes part is ambiguous: decode text with .decode('utf-8'), or give encoded "
                        "image bytes as {'type': 'image', 'image': b'...'}")
    raise ChatError(f"{where}: unsupported content part of type {type(part).__name__}: give text, a PIL image, a "
                    "uint8 numpy array, a float tensor (C, H, W), a pathlib.Path or {'type': 'image', 'image': PATH}")


def parse_messages(messages: Sequence[Any], for_generation: bool = True) -> list[Message]:
    """Validate role/content messages (dicts or `Message`s) -> `Message`s.

    Raises:
        ChatError: an empty list, a message that is not a role/content mapping, an unknown role,
            a part that is neither text nor an image, text that is not valid Unicode, empty content,
            or (for generation) a conversation that does not end with the user.
    """
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ChatError("messages must be a list of {'role': ..., 'content': ...} dicts, e.g. "
                        "[{'role': 'user', 'content': 'draw a red circle'}]")
    if not messages:
        raise ChatError("the message list is empty: give at least one {'role': 'user', 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if isinstance(m, Message):
            role, content = m.role, m.parts
        elif isinstance(m, dict) and "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        else:
            raise ChatError(f"{where} is not a {{'role': ..., 'content': ...}} mapping: {m!r:.120}")
        if not isinstance(role, str) or role not in ROLES:
            raise ChatError(f"{where} has unknown role {role!r:.60}: the chat template knows {' and '.join(ROLES)}"
                            + (" (put instructions into the first user message)" if str(role) == "system" else ""))
        parts = [content] if isinstance(content, str) or isinstance(content, IMAGE_TYPES) else content
        if not isinstance(parts, (list, tuple)):
            raise ChatError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
        named = [(p, where if len(parts) == 1 else f"{where} part {j}") for j, p in enumerate(parts)]
        parts = [p for p in (_part(p, w) for p, w in named) if not (isinstance(p, str) and not p.strip())]
        if not parts:
            raise ChatError(f"{where} ({role}) has no content: give text or an image")
        out.append(Message(role, [p.strip() if isinstance(p, str) else p for p in parts]))
    if for_generation and out[-1].role != "user":
        raise ChatError("the last message is the assistant's: add a user message for the assistant to answer")
    return out


def render(messages: Sequence[Message], tokenizer, image: Callable[[Any], Tensor],
           generation_prompt: bool = True) -> Sample:
    """`Message`s -> one sample (text strings, id lists for the markers, image tensors).

    Args:
        messages: parsed messages (see `parse_messages`).
        tokenizer: has `user_id`, `assistant_id`, `end_id`.
        image: turns an image part into a (C, H, W) tensor at the model's format.
        generation_prompt: end with `<|assistant|>` so the model writes the next turn.
    """
    marker = {"user": tokenizer.user_id, "assistant": tokenizer.assistant_id}
    sample: list = []
    for m in messages:
        parts = m.images + [m.text] if m.role == "user" else m.parts
        sample.append([marker[m.role]])
        sample += [p if isinstance(p, str) else image(p) for p in parts if not (isinstance(p, str) and not p)]
        sample.append([tokenizer.end_id])
    if generation_prompt:
        sample.append([tokenizer.assistant_id])
    return sample


def assistant_targets(ids: Iterable[int], tokenizer) -> list[bool]:
    """Per token of a rendered conversation, whether it is an LM target when only assistant turns are
    trained: the content of each assistant turn (text, `<boi>`, image slots) and its closing `<|end|>`. Role
    markers, user turns, `<bos>` and the final `<eos>` are not (the template writes them, not the model).

    Args:
        ids: the token ids of a sample rendered by `render` (`SequenceBuilder.tokens`).
        tokenizer: has `user_id`, `assistant_id`, `end_id`.
    """
    out, inside = [], False
    for t in ids:
        if t in (tokenizer.user_id, tokenizer.assistant_id):
            out.append(False)
            inside = t == tokenizer.assistant_id
            continue
        out.append(inside)
        inside = inside and t != tokenizer.end_id
    return out
