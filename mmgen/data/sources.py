"""Training data sources: each is a list of items that become interleaved samples.

    digits, shapes     the bundled datasets (no download)
    dialogues          templated conversations over them (`mmgen.data.dialogues`), in the chat template
    edits              image editing conversations over the shapes (`mmgen.data.edits`): image + instruction -> image
    image_folder       a folder of images with a captions JSONL ({"file_name": ..., "text": ...} per line)
    hf                 a Hugging Face `datasets` dataset saved with `save_to_disk` (image and/or text column)
    text               plain-text corpora (a .txt file or a folder of them): text-only LM data
    interleaved        JSONL documents: {"segments": [{"text": ...}, {"image": "path"}, ...]}
A source (the contract: `mmgen.data.source`) is indexed once (missing files and bad lines are dropped
and counted); `sample(i, rng)` loads item i and raises `UnreadableItem` when it cannot, so the caller
can skip and count it.
Image-caption items become caption -> image or image -> caption samples, drawn from `rng`.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmgen.data.dialogues import DialogueSource
from mmgen.data.digits import DigitsDataset
from mmgen.data.edits import EditSource
from mmgen.data.images import fit_tensor, load_image
from mmgen.data.shapes import ShapesDataset
from mmgen.data.shapes import caption as describe_shapes
from mmgen.data.source import Source, UnreadableItem
from mmgen.errors import DataError, UnreadableImage
from mmgen.sequence import Sample


def warn(message: str) -> None:
    """Print a warning line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def caption_sample(image: Any, caption: str, rng: random.Random, p_image_first: float, caption_dropout: float) -> Sample:
    """image -> caption with probability `p_image_first`; else caption -> image, the caption dropped
    (replaced by "") with probability `caption_dropout` so classifier-free guidance has a null condition."""
    if rng.random() < p_image_first:
        return [image, caption]
    if rng.random() < caption_dropout:
        caption = ""
    return [caption, image]


class CaptionSource(Source):
    """(image, caption) items; subclasses implement `image(i)` and `caption(i)`."""

    def __init__(self, cfg):
        self.p_image_first, self.caption_dropout = cfg.p_image_first, cfg.caption_dropout

    def image(self, i: int) -> Any:
        raise NotImplementedError

    def caption(self, i: int) -> str:
        raise NotImplementedError

    def sample(self, i: int, rng: random.Random) -> Sample:
        return caption_sample(self.image(i), self.caption(i), rng, self.p_image_first, self.caption_dropout)

    def texts(self) -> Iterator[str]:
        return (self.caption(i) for i in range(self.n))


def _limit(n: int, limit: int) -> int:
    return min(n, limit) if limit else n


class DigitsSource(CaptionSource):
    def __init__(self, cfg, channels: int, resolution: int):
        super().__init__(cfg)
        self.ds, self.channels, self.resolution = DigitsDataset(cfg.split), channels, resolution
        self.name, self.n = f"digits/{cfg.split}", _limit(len(self.ds), cfg.limit)

    def image(self, i: int) -> Any:
        return fit_tensor(self.ds.images[i], self.channels, self.resolution)

    def caption(self, i: int) -> str:
        return self.ds[i][1]


class ShapesSource(CaptionSource):
    def __init__(self, cfg, seed: int, channels: int, resolution: int):
        super().__init__(cfg)
        self.ds = ShapesDataset(size=_limit(cfg.size, cfg.limit), resolution=max(resolution, 8),
                                max_objects=cfg.max_objects, seed=seed)
        self.channels, self.resolution, self.name, self.n = channels, resolution, "shapes", len(self.ds)

    def image(self, i: int) -> Any:
        return fit_tensor(self.ds[i][0], self.channels, self.resolution)

    def caption(self, i: int) -> str:
        return describe_shapes(self.ds.objects(i))


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-empty line; malformed lines give (number, None)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError:
                    yield lineno, None


class FolderSource(CaptionSource):
    """A folder of images and a captions JSONL; lines naming a missing file are dropped and counted."""

    def __init__(self, cfg, channels: int, resolution: int, verbose: bool):
        super().__init__(cfg)
        folder = Path(cfg.path)
        if not folder.is_dir():
            raise DataError(f"image_folder source: {folder} is not a directory (give the folder of images as path)")
        candidates = [Path(cfg.captions)] if cfg.captions else [folder / "captions.jsonl", folder / "metadata.jsonl"]
        jsonl = next((p for p in candidates if p.is_file()), None)
        if jsonl is None:
            raise DataError(
                f"image_folder source: no captions file ({' or '.join(map(str, candidates))}); write one JSON object "
                'per line, {"file_name": "cat.png", "text": "a cat"}, or set captions: PATH'
            )
        items, bad, missing = [], [], []
        for lineno, rec in _read_jsonl(jsonl):
            name = text = None
            if isinstance(rec, dict):
                name = next((rec[k] for k in ("file_name", "image", "file", "path") if isinstance(rec.get(k), str)), None)
                text = next((rec[k] for k in ("text", "caption") if isinstance(rec.get(k), str)), None)
            if name is None or text is None:
                bad.append(lineno)
            elif not (folder / name).is_file():
                missing.append(name)
            else:
                items.append((str(folder / name), text))
        self.items = items[: _limit(len(items), cfg.limit)]
        if not self.items:
            raise DataError(f"image_folder source: {jsonl} lists no existing image with a caption "
                            f"({len(bad)} malformed lines, {len(missing)} missing files)")
        self.channels, self.resolution = channels, resolution
        self.name, self.n, self.dropped = f"image_folder:{folder.name}", len(self.items), len(bad) + len(missing)
        if verbose and self.dropped:
            warn(f"{jsonl}: skipped {len(bad)} malformed lines (e.g. line {bad[:1]}) and {len(missing)} captions "
                 f"whose image is missing (e.g. {missing[:3]}); training on the other {len(items)}")

    def image(self, i: int) -> Any:
        return _image(self.items[i][0], self.channels, self.resolution)

    def caption(self, i: int) -> str:
        return self.items[i][1]


def _image(ref: Any, channels: int, resolution: int):
    try:
        return load_image(ref, channels, resolution)
    except UnreadableImage as e:
        raise UnreadableItem(str(e)) from None


class HFSource(Source):
    """A `datasets` dataset on disk; rows with an image in `image_column` become caption samples."""

    def __init__(self, cfg, channels: int, resolution: int):
        try:
            import datasets
        except ImportError:
            raise DataError("the 'hf' source needs the datasets package: pip install datasets") from None
        if not Path(cfg.path).exists():
            raise DataError(f"hf source: {cfg.path} does not exist (save a dataset with Dataset.save_to_disk)")
        try:
            ds = datasets.load_from_disk(cfg.path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"hf source: {cfg.path} is not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"hf source {cfg.path}: no split {cfg.split!r}; splits: {sorted(ds)}")
            ds = ds[cfg.split]
        if cfg.text_column not in ds.column_names:
            raise DataError(f"hf source {cfg.path}: no column {cfg.text_column!r} (columns: {ds.column_names}); "
                            "set text_column")
        self.ds, self.cfg, self.channels, self.resolution = ds, cfg, channels, resolution
        self.has_images = cfg.image_column in ds.column_names
        self.name, self.n = f"hf:{Path(cfg.path).name}", _limit(len(ds), cfg.limit)

    def sample(self, i: int, rng: random.Random) -> Sample:
        try:
            row = self.ds[i]
        except Exception as e:  # a row whose image feature fails to decode raises from inside datasets
            raise UnreadableItem(f"{self.name} row {i}: {type(e).__name__}: {e}") from None
        text = row[self.cfg.text_column] or ""
        value = row[self.cfg.image_column] if self.has_images else None
        if value is None:
            if not text:
                raise UnreadableItem(f"{self.name} row {i}: no text and no image")
            return [text]
        if isinstance(value, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        image = _image(value, self.channels, self.resolution)
        return caption_sample(image, text, rng, self.cfg.p_image_first, self.cfg.caption_dropout)

    def texts(self) -> Iterator[str]:
        column = self.ds.select_columns([self.cfg.text_column])
        return (row[self.cfg.text_column] or "" for row in column.select(range(self.n)))


class TextSource(Source):
    """Plain text: one sample per line, paragraph or file; long units are cut into `max_chars` pieces."""

    def __init__(self, cfg, max_chars: int, verbose: bool):
        root = Path(cfg.path)
        if not root.exists():
            raise DataError(f"text source: {root} does not exist (give a .txt file or a folder of them)")
        files = [root] if root.is_file() else sorted(root.rglob("*.txt"))
        if not files:
            raise DataError(f"text source: no .txt files under {root}")
        units: list[str] = []
        for path in files:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                self.dropped += 1
                if verbose:
                    warn(f"text source: cannot read {path} ({e}); skipped")
                continue
            parts = {"line": text.splitlines(), "paragraph": text.split("\n\n"), "file": [text]}[cfg.text_unit]
            for part in (p.strip() for p in parts):
                units += [part[k : k + max_chars] for k in range(0, len(part), max_chars)]
        self.units = units[: _limit(len(units), cfg.limit)]
        if not self.units:
            raise DataError(f"text source: {root} holds no text")
        self.name, self.n = f"text:{root.name}", len(self.units)

    def sample(self, i: int, rng: random.Random) -> Sample:
        return [self.units[i]]

    def texts(self) -> Iterator[str]:
        return iter(self.units)


class InterleavedSource(Source):
    """JSONL documents: {"segments": [...]} or a bare list; a segment is a string, {"text": str} or
    {"image": path relative to the JSONL file}."""

    def __init__(self, cfg, channels: int, resolution: int, verbose: bool):
        path = Path(cfg.path)
        if not path.is_file():
            raise DataError(f"interleaved source: {path} does not exist (a JSONL file of documents)")
        docs, bad, missing = [], [], 0
        for lineno, rec in _read_jsonl(path):
            segs = rec.get("segments") if isinstance(rec, dict) else rec
            doc = _parse_segments(segs, path.parent)
            if doc is None:
                bad.append(lineno)
            elif any(isinstance(s, Path) and not s.is_file() for s in doc):
                missing += 1
            else:
                docs.append(doc)
        self.docs = docs[: _limit(len(docs), cfg.limit)]
        self.dropped = len(bad) + missing
        if not self.docs:
            raise DataError(f"interleaved source: {path} has no usable document ({len(bad)} malformed, "
                            f"{missing} with missing images)")
        if verbose and self.dropped:
            warn(f"{path}: skipped {len(bad)} malformed documents (e.g. line {bad[:1]}) and {missing} with a missing "
                 f"image; training on the other {len(self.docs)}")
        self.name, self.n, self.channels, self.resolution = f"interleaved:{path.name}", len(self.docs), channels, resolution

    def sample(self, i: int, rng: random.Random) -> Sample:
        return [_image(s, self.channels, self.resolution) if isinstance(s, Path) else s for s in self.docs[i]]

    def texts(self) -> Iterator[str]:
        return (s for doc in self.docs for s in doc if isinstance(s, str))


def _parse_segments(segs: Any, root: Path) -> list[str | Path] | None:
    if not isinstance(segs, list) or not segs:
        return None
    out: list[str | Path] = []
    for s in segs:
        if isinstance(s, str):
            out.append(s)
        elif isinstance(s, dict) and isinstance(s.get("text"), str):
            out.append(s["text"])
        elif isinstance(s, dict) and isinstance(s.get("image"), str):
            out.append(root / s["image"])
        else:
            return None
    return out


def build_source(cfg, *, seed: int, channels: int, resolution: int, max_chars: int, verbose: bool = True) -> Source:
    """The source a `SourceConfig` describes, indexed; raises `DataError` naming what is wrong."""
    if cfg.kind == "digits":
        return DigitsSource(cfg, channels, resolution)
    if cfg.kind == "shapes":
        return ShapesSource(cfg, seed, channels, resolution)
    if cfg.kind == "dialogues":
        return DialogueSource(_limit(cfg.size, cfg.limit), seed, channels, resolution, cfg.split, cfg.loss_on)
    if cfg.kind == "edits":
        return EditSource(_limit(cfg.size, cfg.limit), channels, resolution, cfg.split, cfg.loss_on)
    if cfg.kind == "image_folder":
        return FolderSource(cfg, channels, resolution, verbose)
    if cfg.kind == "hf":
        return HFSource(cfg, channels, resolution)
    if cfg.kind == "text":
        return TextSource(cfg, max_chars, verbose)
    return InterleavedSource(cfg, channels, resolution, verbose)
