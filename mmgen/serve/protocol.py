"""The OpenAI wire format: validate request bodies into typed requests, build response bodies.

Validation is our own (no pydantic): every field is checked for type and range here, and every
failure is an `APIError` whose message names the field (`param`) and what is allowed, sent as
OpenAI's `{"error": {"message", "type", "param", "code"}}`. Fields this server does not use are
ignored, except ones whose effect it would silently drop (tools, logprobs, penalties…): those are
refused. Images are only located here (`ImageRef`); `mmgen.serve.images` decodes them later, off
the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmgen.errors import OptionError, check_number
from mmgen.sampling import MAX_SEED
from mmgen.serve.config import ServeConfig

IMAGE_MODES = ("auto", "always", "never")
EXTENSION = "mmgen"  # the extra body field with image settings (openai client: extra_body={"mmgen": {...}})
CHAT_EXTENSION_KEYS = ("image", "steps", "sampler", "guidance", "scale", "top_k")
IMAGES_EXTENSION_KEYS = ("steps", "sampler", "guidance")
UNSUPPORTED = {  # field -> the only value we accept (what "off" means), so nothing is silently ignored
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"), "logprobs": (None, False),
    "top_logprobs": (None, 0), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "audio": (None,), "modalities": (None, ["text"], ["text", "image"]),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ImageRef:
    """An image part of a message, not yet decoded: its URL (data URL or path) and where it was."""

    url: str
    param: str


@dataclass
class ChatRequest:
    """A validated /v1/chat/completions body. `options` are `GenerationOptions` overrides."""

    messages: list[dict]  # {"role": str, "parts": [str | ImageRef]}
    n: int = 1
    seed: int | None = None  # None: a random seed per request
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    image: str = "auto"
    scale: int = 1
    options: dict = field(default_factory=dict)


@dataclass
class ImagesRequest:
    """A validated /v1/images/generations body."""

    prompt: str
    n: int = 1
    seed: int | None = None
    scale: int = 1
    options: dict = field(default_factory=dict)


# -- fields -----------------------------------------------------------------------------------------

def _number(body: dict, name: str, default: Any = None, *, param: str | None = None, **bounds: Any) -> Any:
    """body[name] checked by `check_number` (bounds as there); `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    try:
        check_number(param or name, value, **bounds)
    except OptionError as e:
        raise APIError(400, str(e), param or name) from None
    return value


def _typed(body: dict, name: str, kind: type | tuple, default: Any, what: str, param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise APIError(400, f"{param or name} must be {what}, got {value!r:.80}", param or name)
    return value


def check_model(body: dict, model_id: str) -> None:
    """404 `model_not_found` unless `model` is absent or names the served model."""
    model = body.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"the model {model!r:.80} does not exist: this server serves {model_id!r} "
                            "(GET /v1/models)", "model", "model_not_found")


def _seed(body: dict, n: int) -> int | None:
    """The request's base seed (choice i uses seed + i), or None for a random one."""
    return _number(body, "seed", low=0, high=MAX_SEED - (n - 1), integer=True)


def _extension(body: dict, allowed: tuple[str, ...], cfg: ServeConfig) -> dict:
    ext = _typed(body, EXTENSION, dict, {}, f"an object with keys among {list(allowed)}")
    unknown = sorted(set(ext) - set(allowed))
    if unknown:
        raise APIError(400, f"unknown {EXTENSION} field(s) {unknown}: the fields are {list(allowed)}", EXTENSION)
    where = {k: f"{EXTENSION}.{k}" for k in allowed}
    options = {
        "image_steps": _number(ext, "steps", param=where["steps"], low=1, high=cfg.max_image_steps, integer=True),
        "sampler": _typed(ext, "sampler", str, None, "a sampler name (a string)", where["sampler"]),
        "guidance": _number(ext, "guidance", param=where["guidance"], low=0, high=100),
    }
    if "top_k" in allowed:
        options["top_k"] = _number(ext, "top_k", param=where["top_k"], low=0, integer=True)
    return {k: v for k, v in options.items() if v is not None}


def _refuse_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise APIError(400, f"{name} is not supported by this server (got {body[name]!r:.80}); leave it out",
                           name, "unsupported_parameter")


# -- chat -------------------------------------------------------------------------------------------

def _parts(content: Any, where: str) -> list:
    """Message content (a string or a list of OpenAI content parts) -> text strings and `ImageRef`s."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list) or not content:
        raise APIError(400, f"{where} must be a string or a non-empty list of content parts, got {content!r:.80}",
                       where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, f"{at}.image_url must be {{'url': 'data:image/png;base64,...'}}", f"{at}.image_url")
            parts.append(ImageRef(url, f"{at}.image_url"))
        else:
            raise APIError(400, f"{at} must be {{'type': 'text', 'text': str}} or {{'type': 'image_url', "
                                f"'image_url': {{'url': str}}}}, got {part!r:.80}", at)
    return parts


def _messages(body: dict, cfg: ServeConfig) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {'role': 'user' | 'assistant', 'content': ...}",
                       "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise APIError(400, f"{where} must be an object with 'role' and 'content', got {m!r:.80}", where)
        if m["role"] not in ("user", "assistant"):
            hint = " (put instructions into the first user message)" if m["role"] in ("system", "developer") else ""
            raise APIError(400, f"{where}.role is {m['role']!r:.40}: this model's chat template knows 'user' and "
                                f"'assistant'{hint}", f"{where}.role")
        out.append({"role": m["role"], "parts": _parts(m["content"], f"{where}.content")})
    images = sum(isinstance(p, ImageRef) for m in out for p in m["parts"])
    if images > cfg.max_input_images:
        raise APIError(400, f"{images} images in the messages: this server takes at most {cfg.max_input_images} "
                            "per request (--max-input-images)", "messages")
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's (the assistant answers it)", f"messages[{len(out) - 1}]")
    return out


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a non-empty string or a list of up to 4 of them, got {body['stop']!r:.80}",
                       "stop")
    return stop


def parse_chat(body: Any, cfg: ServeConfig, model_id: str, image_size: int) -> ChatRequest:
    """A /v1/chat/completions body -> `ChatRequest`; raises `APIError` naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_model(body, model_id)
    _refuse_unsupported(body)
    messages = _messages(body, cfg)
    n = _number(body, "n", 1, low=1, high=cfg.max_n, integer=True)
    options = {"temperature": _number(body, "temperature", low=0, high=2),
               "top_p": _number(body, "top_p", low=0, high=1, low_open=True)}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    options["max_new_tokens"] = _number(body, name, low=1, high=cfg.max_tokens, integer=True)
    options = {k: v for k, v in options.items() if v is not None} | _extension(body, CHAT_EXTENSION_KEYS, cfg)
    ext = body.get(EXTENSION) or {}
    image = ext.get("image", "auto")
    if image not in IMAGE_MODES:
        raise APIError(400, f"{EXTENSION}.image must be one of {list(IMAGE_MODES)}, got {image!r:.40}",
                       f"{EXTENSION}.image")
    scale = _number(ext, "scale", 1, param=f"{EXTENSION}.scale", low=1, high=max(1, cfg.max_output_size // image_size),
                    integer=True)
    stream_options = _typed(body, "stream_options", dict, {}, "an object like {'include_usage': true}")
    return ChatRequest(messages, n, _seed(body, n), _typed(body, "stream", bool, False, "true or false"),
                       _typed(stream_options, "include_usage", bool, False, "true or false",
                              "stream_options.include_usage"),
                       _stop(body), image, scale, options)


# -- images -----------------------------------------------------------------------------------------

def _scale(size: Any, image_size: int, cfg: ServeConfig) -> int:
    """"WxH" -> the integer upscaling of the model's image size it asks for."""
    allowed = f"{image_size}x{image_size} (the model's size) or a multiple up to {cfg.max_output_size}x" \
              f"{cfg.max_output_size}, e.g. {2 * image_size}x{2 * image_size} (upscaled with nearest neighbours)"
    if size is None or size == "auto":
        return 1
    w, _, h = size.partition("x") if isinstance(size, str) else ("", "", "")
    if not (w.isdigit() and h.isdigit()) or w != h or int(w) % image_size or not 0 < int(w) <= cfg.max_output_size:
        raise APIError(400, f"size {size!r:.40} is not available: this model draws {image_size}x{image_size} images; "
                            f"ask for {allowed}", "size")
    return int(w) // image_size


def parse_images(body: Any, cfg: ServeConfig, model_id: str, image_size: int) -> ImagesRequest:
    """A /v1/images/generations body -> `ImagesRequest`; raises `APIError` naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_model(body, model_id)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise APIError(400, "prompt must be a non-empty string", "prompt")
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise APIError(400, f"response_format {fmt!r:.40} is not available: this server keeps no files to link to; "
                            "use 'b64_json'", "response_format")
    n = _number(body, "n", 1, low=1, high=cfg.max_n, integer=True)
    return ImagesRequest(prompt, n, _seed(body, n), _scale(body.get("size"), image_size, cfg),
                         _extension(body, IMAGES_EXTENSION_KEYS, cfg))


# -- responses --------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, created: int, model: str, choices: list[tuple[Any, str]], use: dict) -> dict:
    """A `chat.completion` body; `choices` are (content, finish_reason) pairs."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": reason,
                         "logprobs": None} for i, (content, reason) in enumerate(choices)],
            "usage": use}


def chunk(rid: str, created: int, model: str, index: int | None, delta: dict | None = None,
          finish_reason: str | None = None, use: dict | None = None) -> dict:
    """A `chat.completion.chunk`: one choice's delta, or (index None) the usage chunk with no choices."""
    body: dict = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": []}
    if index is not None:
        body["choices"] = [{"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}]
    if use is not None:
        body["usage"] = use
    return body


def images(created: int, b64: list[str]) -> dict:
    return {"created": created, "data": [{"b64_json": b} for b in b64]}


def models(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "mmgen"}]}
