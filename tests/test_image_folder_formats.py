"""Every kind of file an image folder may hold meets the model through one conversion (`to_grey_or_rgb`):
other sizes and aspect ratios, grey, grey + alpha, RGBA, palette with and without transparency, 16-bit
PNG, CMYK JPEG and a JPEG with an EXIF orientation each come out as the exact pixels the rule gives,
and a folder mixing them all trains through `mmgen train` without skipping one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from train_helpers import micro_config, restore_threads  # noqa: F401 (autouse fixture)

from mmgen.data.images import load_image
from mmgen.data.sources import build_source
from mmgen.train.config import SourceConfig
from mmgen.train.entrypoint import main
from mmgen.train.tracking import read_log

R = 16  # the model's resolution in these tests: most files are R×R, so no resampling blurs the pixels
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def stripes(size: tuple[int, int], colors: list, mode: str = "RGB", vertical: bool = True) -> Image.Image:
    """A `size` image of equal stripes side by side (`vertical`) or stacked, one per color."""
    image, (w, h), n = Image.new(mode, size), size, len(colors)
    length = w if vertical else h
    for k, color in enumerate(colors):
        a, b = k * length // n, (k + 1) * length // n
        image.paste(color, (a, 0, b, h) if vertical else (0, a, w, b))
    return image


def palette(transparent: bool) -> Callable[[Path], None]:
    """A writer of a P image: left half index 0 (10, 20, 30), right half index 1 (200, 100, 50); index 0 is the
    transparent one if `transparent`."""

    def write(path: Path) -> None:
        image = stripes((R, R), [0, 1], "P")
        image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
        image.save(path, **({"transparency": 0} if transparent else {}))

    return write


def deep(path: Path) -> None:
    """16-bit grey: four stripes 0, 100·257, 30000, 65535."""
    Image.fromarray(np.repeat(np.array([[0, 25700, 30000, 65535]], np.uint16), R, 0).repeat(R // 4, 1)).save(path)


def rgba(path: Path) -> None:
    """Left half transparent blue, top right opaque red, bottom right half-transparent red."""
    image = Image.new("RGBA", (R, R), (0, 0, 255, 0))
    image.paste((255, 0, 0, 255), (R // 2, 0, R, R // 2))
    image.paste((255, 0, 0, 128), (R // 2, R // 2, R, R))
    image.save(path)


def phone(path: Path) -> None:
    """A 128×64 JPEG stored sideways: left half white, right half black, EXIF orientation 6 (rotate 90° clockwise
    to view), so upright its top half is white. Large enough that the reader decodes it at 1/4 (`draft`)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stripes((8 * R, 4 * R), [WHITE, (0, 0, 0)]).save(path, quality=95, exif=exif)


WRITERS: dict[str, Callable[[Path], None]] = {
    "wide.png": lambda p: stripes((3 * R, R), [RED, GREEN, BLUE]).save(p),
    "tall.png": lambda p: stripes((R, 3 * R), [RED, GREEN, BLUE], vertical=False).save(p),
    "grey.png": lambda p: Image.new("L", (R, R), 77).save(p),
    "grey_alpha.png": lambda p: stripes((R, R), [(100, 255), (100, 0)], "LA").save(p),
    "rgba.png": rgba,
    "palette.png": palette(transparent=False),
    "palette_transparent.png": palette(transparent=True),
    "deep.png": deep,
    "cmyk.jpg": lambda p: Image.new("CMYK", (R, R), (0, 255, 255, 0)).save(p, quality=95),
    "phone.jpg": phone,
}


def halves(left: tuple[int, ...], right: tuple[int, ...]) -> np.ndarray:
    """(R, R, C) uint8 pixels: `left` on the left half, `right` on the right."""
    out = np.empty((R, R, len(left)), np.uint8)
    out[:, : R // 2], out[:, R // 2 :] = left, right
    return out


def pixels(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) integers 0..255."""
    return ((x + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(int)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An image folder holding one file of each kind, with captions.jsonl."""
    d = tmp_path / "mixed"
    d.mkdir()
    for name, write in WRITERS.items():
        write(d / name)
    lines = [json.dumps({"file_name": name, "text": f"a picture called {name.split('.')[0]}"}) for name in WRITERS]
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_other_aspect_ratios_are_resized_by_the_short_side_and_center_cropped(folder):
    for name in ("wide.png", "tall.png"):  # 3R × R and R × 3R: the middle stripe is the center crop
        assert (pixels(load_image(folder / name, 3, R)) == GREEN).all(), name
    small = pixels(load_image(folder / "wide.png", 3, R // 2))  # 48×16 -> 24×8 -> the middle 8 columns
    assert (small[:, 1:-1] == GREEN).all()  # the edge columns blend into the neighbouring stripes


def test_grey_becomes_rgb_and_stays_grey(folder):
    assert (pixels(load_image(folder / "grey.png", 3, R)) == 77).all()
    assert (pixels(load_image(folder / "grey.png", 1, R)) == 77).all()
    assert (pixels(load_image(folder / "grey_alpha.png", 1, R)) == halves((100,), (255,))).all()


def test_transparency_is_composited_over_white(folder):
    x = pixels(load_image(folder / "rgba.png", 3, R))
    assert (x[:, : R // 2] == WHITE).all()  # transparent blue: white, not blue and not black
    assert (x[: R // 2, R // 2 :] == RED).all()
    assert np.abs(x[R // 2 :, R // 2 :] - (255, 127, 127)).max() <= 1  # half-transparent red over white: pink
    rgba_array = np.asarray(Image.open(folder / "rgba.png"))  # the same rule for a uint8 (H, W, 4) array
    assert (pixels(load_image(rgba_array, 3, R)) == x).all()


def test_palette_images_with_and_without_transparency(folder):
    assert (pixels(load_image(folder / "palette.png", 3, R)) == halves((10, 20, 30), (200, 100, 50))).all()
    assert (pixels(load_image(folder / "palette_transparent.png", 3, R)) == halves(WHITE, (200, 100, 50))).all()


def test_16_bit_grey_is_scaled_by_its_range_not_by_its_brightest_pixel(folder):
    assert Image.open(folder / "deep.png").mode.startswith("I")
    x = pixels(load_image(folder / "deep.png", 1, R))[..., 0]
    assert (x == np.array([0, 100, 117, 255]).repeat(R // 4)).all()  # 30000 / 257 = 116.7
    dark = folder / "dark.png"
    Image.fromarray(np.full((R, R), 2570, np.uint16)).save(dark)  # a dark image stays dark: 2570 / 257 = 10
    assert (pixels(load_image(dark, 1, R)) == 10).all()


def test_cmyk_jpeg_becomes_rgb(folder):
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert np.abs(pixels(load_image(folder / "cmyk.jpg", 3, R)) - RED).max() <= 4  # JPEG: within 4 levels


def test_exif_orientation_turns_the_photo_upright(folder):
    x = load_image(folder / "phone.jpg", 1, R)[0]  # upright 64×128 -> 16×32 -> the middle 16 rows
    assert x.shape == (R, R)
    assert (x[: R // 2 - 2] > 0.95).all() and (x[R // 2 + 2 :] < -0.95).all()  # top white, bottom black


def test_a_folder_of_every_kind_trains_without_skipping_one(folder, tmp_path):
    src = build_source(SourceConfig(kind="image_folder", path=str(folder)), seed=0, channels=3, resolution=R,
                       max_chars=200, verbose=False)
    assert len(src) == len(WRITERS) and src.dropped == 0
    for i, (path, _) in enumerate(src.items):  # the source reads each file with load_image
        assert torch.equal(src.image(i), load_image(path, 3, R))
    image = {"tokenizer": {"kind": "pixels", "channels": 3, "latent_channels": 3, "resolution": 8}}
    cfg = micro_config(tmp_path / "run", tmp_path, tokenizer={"path": None, "vocab_size": 300},
                       model={"image": image}, data={"sources": [{"kind": "image_folder", "path": str(folder)}]},
                       train={"steps": 2, "batch_size": 4}, checkpoint={"every": 0}, log={"every": 1})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(tmp_path / "run.yaml")]) == tmp_path / "run"
    rows = read_log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2] and int(rows[-1]["skipped_items"]) == 0
