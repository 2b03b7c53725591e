"""Files on disk: atomic writes, safetensors, model directories and PNG grids; nothing is unpickled.

Every write goes to a temporary file next to its target, is fsynced, renamed over the target
(`os.replace`), and the directory is fsynced: a crash leaves the old file or the new one, never
half of one. A model directory (the model's or an image tokenizer's) holds `config.json` and
`model.safetensors`, plus extra files such as `tokenizer.model`; `config.json` is written last,
so a directory with a config is complete; loading one checks every file before use and names the
file and the fix in a `ModelFileError`. This module imports no other mmgen module but `mmgen.errors`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from safetensors.torch import save_file as _safetensors_save_file
from safetensors.torch import save_model as _safetensors_save_model
from torch import Tensor, nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from mmgen.errors import ModelFileError, OptionError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"  # the SentencePiece text tokenizer next to a model's weights
TOKENIZER_DIGEST = "tokenizer_sha256"  # weights-header key: the SHA-256 of the tokenizer saved with them


def files_digest(files: dict[str, bytes]) -> str:
    """The SHA-256 that identifies a text tokenizer's files (name -> bytes): of the bytes of a single file
    (so a SentencePiece `tokenizer.model` keeps the digest it always had), else of each file's name and
    SHA-256, sorted by name."""
    if len(files) == 1:
        return hashlib.sha256(next(iter(files.values()))).hexdigest()
    lines = "".join(f"{name}\0{hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(files.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


# -- weight dtypes ---------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def weight_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype to cast loaded weights to: a name of DTYPES, one of its torch dtypes, or None (as stored)."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise OptionError(f"dtype = {dtype!r:.40}: must be one of {', '.join(DTYPES)} (bf16 for inference on GPUs "
                      "that have it, fp16 on older ones, fp32 on CPUs), a matching torch dtype, or None for "
                      "the weights as stored")


def load_device(device: str | torch.device) -> torch.device:
    """Where to load a model: "auto" is CUDA when this machine has it, else the CPU; other names as torch reads
    them. Raises OptionError for a name torch does not know or a CUDA device this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"device = {device!r:.40}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if out.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device = {device!r}: this machine (or this torch build) has no CUDA device; use cpu or auto")
    return out


# -- atomic writes ---------------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temporary file beside `path`, fsync it and rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically; the parent directory must exist."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    _replace(path, lambda tmp: tmp.write_bytes(payload))


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON with a final newline, atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def save_file(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a dict of tensors (moved to CPU, made contiguous) as safetensors, atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _replace(path, lambda tmp: _safetensors_save_file(cpu, str(tmp), metadata=metadata))


def save_model(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a module's state as safetensors, atomically; tied weights are stored once
    (`safetensors.torch.load_model` ties them again)."""
    _replace(path, lambda tmp: _safetensors_save_model(module, str(tmp), metadata=metadata))


# -- model directories -----------------------------------------------------------------------------


def save_directory(directory: str | Path, config: dict[str, Any], module: nn.Module,
                   extra_files: dict[str, bytes] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write `module` as `directory`/model.safetensors, then `extra_files` (name -> bytes), then
    config.json last. Each file is replaced atomically; the directory is created if needed.

    Args:
        config: the JSON-able dict that `load_directory`'s `build` turns back into an empty module.
        metadata: string pairs stored in the safetensors header besides {"format": "pt"}.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_model(module, d / WEIGHTS_FILE, metadata={"format": "pt", **(metadata or {})})
    for name, data in (extra_files or {}).items():
        atomic_write(d / name, data)
    write_json(d / CONFIG_FILE, config)


def load_directory(directory: str | Path, build: Callable[[dict[str, Any]], nn.Module],
                   device: str | torch.device = "cpu", what: str = "mmgen model",
                   dtype: str | torch.dtype | None = None) -> nn.Module:
    """Rebuild a module saved by `save_directory`: `build(config dict)`, then its weights, in eval mode,
    on `device` and cast to `dtype` (see `weight_dtype`; checked before any file is read).

    Every file is checked before use: config.json must be a UTF-8 JSON object that `build` accepts
    without making more parameters than the weights file holds, model.safetensors a complete
    safetensors file whose tensor names, shapes and kinds (float or not) are the module's, and whose
    values are finite.

    Args:
        build: makes the empty module from config.json's dict; its ValueError (e.g. a `ConfigError`
            naming the field) is re-raised as a ModelFileError naming config.json.
        what: how errors name the directory ("mmgen model", "mmgen image tokenizer").
    Raises:
        FileNotFoundError: the directory or one of its two files is missing (the message names it).
        ModelFileError: a file is corrupt, malformed, or does not belong with the other (the message
            names the file, the field or tensors, and the fix).
    """
    dtype = weight_dtype(dtype)
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"{what} directory {d} does not exist")
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is a file, not a {what} directory (give the directory holding {CONFIG_FILE})")
    config, weights = d / CONFIG_FILE, d / WEIGHTS_FILE
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a complete {what} directory")
    raw = read_json_object(config)
    header = read_weights_header(weights)
    module = _build(build, raw, config, weights, header, what)
    check_weights_fit(module, header, weights, config)
    load_model(module, str(weights), strict=True, device=str(device))
    check_finite(module, weights)
    return module.to(device=device, dtype=dtype).eval()


class _TooLarge(Exception):
    """Raised inside a module's constructor once it has made more parameter values than its file can hold."""


def _build(build: Callable[[dict[str, Any]], nn.Module], raw: dict[str, Any], config: Path, weights: Path,
           header: dict[str, tuple[str, tuple[int, ...]]], what: str) -> nn.Module:
    """`build(raw)`, stopped once it has made over twice as many parameter values as `weights` holds plus 1e8,
    so that a config.json describing a far larger model than its weights (a hostile layer count or width)
    fails at once instead of allocating and initializing it; smaller mismatches reach `check_weights_fit`,
    which lists the tensors."""
    held = sum(math.prod(shape) for _, shape in header.values())
    limit = 2 * held + 100_000_000
    seen: set[int] = set()
    made = 0

    def count(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        nonlocal made
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            made += param.numel()
            if made > limit:
                raise _TooLarge

    hook = register_module_parameter_registration_hook(count)
    try:
        return build(raw)
    except _TooLarge:
        raise ModelFileError(f"{config} describes a {what} larger than {weights} holds (over {made:,} parameter "
                             f"values, the file has {held:,}): weights of another model, or an "
                             "edited config? Use the config.json saved with these weights") from None
    except ValueError as e:
        raise ModelFileError(f"{config}: {e}") from None
    except (RuntimeError, MemoryError, OverflowError) as e:  # sizes too large to allocate at all
        raise ModelFileError(f"{config} describes a {what} that cannot be built here ({type(e).__name__}: "
                             f"{str(e)[:200]}); check its sizes, or use the config.json saved with the "
                             "weights") from None
    finally:
        hook.remove()


def read_json_object(path: str | Path, fix: str = "fix the file, or copy the config.json that was saved with the "
                     "model") -> dict[str, Any]:
    """The JSON object in the file `path`; a ModelFileError names the file if it is not UTF-8 text, not
    JSON, or JSON but not an object (a list, a number), and ends with `fix`."""
    path = Path(path)
    return parse_json_object(path.read_bytes(), str(path), fix)


def parse_json_object(data: bytes, source: str, fix: str) -> dict[str, Any]:
    """The JSON object in `data` (the bytes of `source`, which errors name); ModelFileError as above."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{source} is not UTF-8 text (byte {e.start} is invalid): not JSON; {fix}") from None
    if not text.strip():
        raise ModelFileError(f"{source} is empty; {fix}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise ModelFileError(f"{source} is not valid JSON: {e.msg} at {where}; {fix}") from None
    except RecursionError:
        raise ModelFileError(f"{source} is not a config: its JSON is nested too deeply; {fix}") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{source} holds a JSON {type(value).__name__}, not an object of config fields; {fix}")
    return value


def read_weights_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype such as "F32", shape) of a safetensors file; a ModelFileError
    says what the file is instead (empty, truncated, a pickle, JSON, random bytes)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
            return {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in slices.items()}
    except SafetensorError as e:
        raise ModelFileError(f"{path} {_not_safetensors(path, e)}; copy {path.name} again from where the model was "
                             "saved (e.g. the training run's output directory), or save the model again") from None


def read_weights_metadata(path: Path) -> dict[str, str]:
    """The string pairs stored in a safetensors header (`save_directory`'s `metadata`); the same
    ModelFileError as `read_weights_header` for a file that is not safetensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise ModelFileError(f"{path} {_not_safetensors(path, e)}; copy {path.name} again from where the model was "
                             "saved (e.g. the training run's output directory), or save the model again") from None


def _not_safetensors(path: Path, error: Exception) -> str:
    """What a file that safetensors refuses is instead, as the rest of a sentence naming it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        return "is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "is a pickle (a torch.save checkpoint?), not safetensors; mmgen never unpickles files"
    if head.lstrip()[:1] in (b"{", b"["):
        return "holds JSON text, not safetensors tensors"
    promised = _promised_size(path)
    if promised is not None and promised > size:
        return f"is truncated: it holds {size} bytes, its header describes {promised} (an interrupted copy?)"
    if promised is not None and promised < size:
        return f"has {size - promised} bytes after its last tensor (a corrupted copy?)"
    return f"is not a safetensors file ({error})"


def _promised_size(path: Path) -> int | None:
    """The file size a safetensors header at the start of `path` describes; None if there is no such header."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            text = f.read(n) if 2 <= n <= 100_000_000 else b""
        if not text.startswith(b"{"):
            return None
        if len(text) < n:
            return 8 + n  # the header itself is cut off
        ends = [v["data_offsets"][1] for k, v in json.loads(text).items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def check_weights_fit(module: nn.Module, header: dict[str, tuple[str, tuple[int, ...]]], weights: Path,
                      config: Path) -> None:
    """Raise a ModelFileError listing the first tensors of `weights` (its `header`) that do not fit `module`:
    shapes or kinds that differ, names missing from the file, names the module does not have."""
    expected = module.state_dict()
    ptr = {k: t.data_ptr() if t.numel() else id(t) for k, t in expected.items()}
    stored = {ptr[k] for k in header if k in ptr}  # tied weights (lm_head = embed_tokens) are stored once
    missing = [k for k in expected if k not in header and ptr[k] not in stored]
    unexpected = [k for k in header if k not in expected]
    wrong = []
    for k, t in expected.items():  # in the module's order: the embedding first, then layer by layer
        dtype, shape = header.get(k, (None, None))
        if shape is not None and shape != tuple(t.shape):
            wrong.append(f"{k}: file {shape} vs config {tuple(t.shape)}")
        elif dtype is not None and t.is_floating_point() != dtype.startswith(("F", "BF")):
            wrong.append(f"{k}: file dtype {dtype} vs config {t.dtype}")
    parts = ([f"tensors differ: {_first(wrong, 3, '; ')}"] if wrong else []) + (
        [f"missing from the file: {_first(missing, 5)}"] if missing else []) + (
        [f"not in the model: {_first(unexpected, 5)}"] if unexpected else [])
    if parts:
        raise ModelFileError(f"{weights} does not match {config} (weights of another model, or an edited config?): "
                             f"{'; '.join(parts)}. Use the config.json saved with these weights, or the weights "
                             "saved with this config")


def check_finite(module: nn.Module, weights: Path) -> None:
    """Raise a ModelFileError naming the first tensors loaded from `weights` that hold NaN or infinite values."""
    bad = [k for k, t in module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ModelFileError(f"{weights} holds NaN or infinite values in {_first(bad, 3)}: the file is corrupt, or "
                             "was saved from a training run that diverged; use an earlier checkpoint")


def _first(items: list[str], n: int, sep: str = ", ") -> str:
    """The first `n` of `items` joined by `sep`, with the total when some are left out."""
    return sep.join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


# -- images ----------------------------------------------------------------------------------------


def save_image_grid(images: Tensor, path: str | Path, scale: int = 4, pad: int = 2,
                    labels: list[str] | None = None) -> None:
    """Save images in [-1, 1] as one PNG, atomically: (N, C, H, W) as one row, (R, N, C, H, W) as R rows
    of N. Each image is upscaled `scale`× (nearest) on a grey canvas with `pad` pixels between images;
    `labels` are drawn above the columns (grey images then become RGB). Parent directories are made."""
    from PIL import Image, ImageDraw

    if images.dim() == 4:
        images = images[None]
    if images.dim() != 5:
        raise ValueError(f"save_image_grid takes (N, C, H, W) or (rows, N, C, H, W) images, got {tuple(images.shape)}")
    rows, cols, c, h, w = images.shape
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    if labels and c == 1:
        x, c = x.expand(rows, cols, 3, h, w), 3  # grey -> RGB, so the labels can be drawn in white
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)  # (R, N, C, H·s, W·s)
    top = 14 if labels else 0
    hs, ws = h * scale + pad, w * scale + pad
    canvas = torch.full((c, top + rows * hs + pad, cols * ws + pad), 64, dtype=torch.uint8)
    for r in range(rows):
        for k in range(cols):
            y0, x0 = top + pad + r * hs, pad + k * ws
            canvas[:, y0 : y0 + h * scale, x0 : x0 + w * scale] = x[r, k]
    array = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if c == 1 else array)
    if labels:
        draw = ImageDraw.Draw(img)
        for k, label in enumerate(labels):
            draw.text((pad + k * ws + 1, 1), label[: max(1, ws // 6)], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
