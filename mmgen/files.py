"""Files on disk: atomic writes, safetensors, model directories and PNG grids; nothing is unpickled.

Every write goes to a temporary file next to its target, is fsynced, renamed over the target
(`os.replace`), and the directory is fsynced: a crash leaves the old file or the new one, never
half of one. A model directory (the model's or an image tokenizer's) holds `config.json` and
`model.safetensors`, plus extra files such as `tokenizer.model`; `config.json` is written last,
so a directory with a config is complete. This module imports no other mmgen module.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model
from safetensors.torch import save_file as _safetensors_save_file
from safetensors.torch import save_model as _safetensors_save_model
from torch import Tensor, nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"  # the SentencePiece text tokenizer next to a model's weights


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
                   device: str | torch.device = "cpu", what: str = "mmgen model") -> nn.Module:
    """Rebuild a module saved by `save_directory`: `build(config dict)`, then its weights, in eval mode.

    Args:
        build: makes the empty module from config.json's dict; its ValueError / TypeError is re-raised
            naming config.json.
        what: how errors name the directory ("mmgen model", "mmgen image tokenizer").
    Raises:
        FileNotFoundError: the directory or one of its two files is missing (the message names it).
        ValueError: config.json is malformed, or the weights do not fit the module it describes.
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"{what} directory {d} does not exist")
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is a file, not a {what} directory (give the directory holding {CONFIG_FILE})")
    config, weights = d / CONFIG_FILE, d / WEIGHTS_FILE
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a complete {what} directory")
    try:
        module = build(json.loads(config.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config}: {e}") from None
    check_weight_shapes(module, weights, config)
    missing, unexpected = load_model(module, str(weights), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {config}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return module.to(device).eval()


def check_weight_shapes(module: nn.Module, weights: Path, config: Path) -> None:
    """Raise a ValueError naming the first tensors whose shapes in `weights` differ from `module`'s."""
    expected = module.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k in expected}
    wrong = [f"{k}: file {s} vs config {tuple(expected[k].shape)}" for k, s in shapes.items()
             if s != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"{weights} does not match {config} (was config.json edited or copied from another "
                         f"model?): {'; '.join(wrong[:3])}")


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
