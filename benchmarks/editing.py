"""Image editing on held-out edits: does the model make the change asked for and keep the rest?

    python benchmarks/editing.py                                   # bundled edit-tiny, 40 held-out edits per kind
    python benchmarks/editing.py --model chat-tiny                 # the bundled chat model
    python benchmarks/editing.py --model runs/edit-tiny --per-kind 100 --docs docs/editing
    python benchmarks/editing.py --per-kind 4 --docs /tmp/edit-docs  # a quick end-to-end check

For each kind of edit (`mmgen.data.edits`: recolor, reshape, move, add, remove), `--per-kind` edits
`sample_edit(random.Random(seed·1000 + i), split, kinds=[kind])`, by default from the held-out tenth
that training never sees, on new renders. The model gets [image before, instruction] as one user turn
(`Chat.batch`, 32 conversations at a time, conversation k with seed `--seed` + k) and the first image of
its reply is read by `mmgen.shape_judge.ShapeJudge` (the objects of each cell of the 3×3 grid):

    change made  recolor, reshape, move: the new object (color, shape) is at its cell (move: and the old cell
                 is empty); add: the new object is at its cell; remove: the removed object's cell is empty.
    preserved    every object the edit does not touch is at its cell unchanged, and no cell outside the
                 edit's (before and after) holds anything.
    both         the two: the judge reads exactly the scene after the edit.
    caption right  the reply's text before its image, lowercased, without punctuation and the answer's
                 opening ("here is", "done:", "ok,", "sure! here is"), names the objects of the scene after
                 (in any order: the image does not say in which order they were placed).

A reply without an image fails both and counts as "image missing". The same checks on the real renders
of the scenes after the edits give the judge's ceiling, printed below the table. `--docs DIR` writes
`editing_grid.png`: two edits per kind, before | instruction and reply | the model's image | the real one.
"""

from __future__ import annotations

import argparse
import io
import random
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mmgen.assets import BUNDLED, model_directory
from mmgen.chat import Chat
from mmgen.data.edits import ANSWER, EDIT_KINDS, SPLITS, Edit, sample_edit
from mmgen.data.shapes import ShapeObject
from mmgen.errors import OptionError
from mmgen.files import atomic_write
from mmgen.shape_judge import ShapeJudge

BATCH = 32
SCALE = 8  # the grid's nearest-neighbour upscaling
TEXT_WIDTH = 360  # the grid's text column, pixels
OPENINGS = sorted({" ".join(t.split("{x}")[0].translate(str.maketrans("", "", string.punctuation)).split())
                   for t in ANSWER}, key=len, reverse=True)  # "sure here is", "here is", "done", "ok"


@dataclass
class Result:
    """One edit asked of the model: its reply (text and first image) and the judge's verdicts."""

    edit: Edit
    text: str  # the reply's text before its first image (all of it when there is none)
    image: Image.Image | None
    change: bool
    preserved: bool
    caption: bool


def normalize(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def names_caption(text: str, caption: str) -> bool:
    """Whether `text`, without its opening ("here is", ...), names the objects of `caption`, in any order
    (both normalized; a scene after an edit has at most two objects, joined by "and")."""
    said = normalize(text)
    for opening in OPENINGS:
        if said == opening or said.startswith(opening + " "):
            said = said[len(opening):].strip()
            break
    return sorted(said.split(" and ")) == sorted(normalize(caption).split(" and "))


def judge_edit(edit: Edit, found: Sequence[ShapeObject]) -> tuple[bool, bool]:
    """(change made, preserved) for the objects `found` in an image answering `edit`."""
    at = {o.position: o for o in found}
    before, after = set(edit.before.objects), set(edit.after.objects)
    old = next(iter(before - after), None)  # the object changed or removed (None: add)
    new = next(iter(after - before), None)  # what it became, or the object added (None: remove)
    if edit.kind == "remove":
        change = old.position not in at
    else:
        change = at.get(new.position) == new and (edit.kind != "move" or old.position not in at)
    kept = all(at.get(o.position) == o for o in before & after)
    return change, kept and set(at) <= {o.position for o in before | after}


def sample_edits(per_kind: int, split: str, seed: int) -> tuple[list[Edit], list[str]]:
    """`per_kind` edits of each kind, edit i from random.Random(seed·1000 + i); and the kinds that have no
    edit in `split` (`sample_edit` finds none: no key of that kind hashes into the split)."""
    edits, missing = [], []
    for kind in EDIT_KINDS:
        try:
            edits += [sample_edit(random.Random(seed * 1000 + i), split, kinds=[kind]) for i in range(per_kind)]
        except ValueError:
            missing.append(kind)
    return edits, missing


def split_reply(parts: Sequence[object]) -> tuple[str, Image.Image | None]:
    """A reply's text before its first image (all text without one), and that image."""
    texts: list[str] = []
    for part in parts:
        if isinstance(part, Image.Image):
            return " ".join(texts), part
        texts.append(str(part))
    return " ".join(texts), None


def ask(chat: Chat, edits: Sequence[Edit], seed: int, options: dict) -> list[list]:
    """The model's replies to [image before, instruction], BATCH conversations at a time."""
    size, replies = chat.image_size, []
    for start in range(0, len(edits), BATCH):
        chunk = edits[start:start + BATCH]
        t0 = time.perf_counter()
        conversations = [[{"role": "user", "content": [Image.fromarray(e.before.render(size)), e.instruction]}]
                         for e in chunk]
        replies += chat.batch(conversations, seed=seed + start, **options)
        print(f"edits {start + 1}-{start + len(chunk)} of {len(edits)}: {time.perf_counter() - t0:.1f} s", flush=True)
    return replies


def judge_replies(judge: ShapeJudge, edits: Sequence[Edit], replies: Sequence[list]) -> list[Result]:
    results = []
    for edit, reply in zip(edits, replies, strict=True):
        text, image = split_reply(reply)
        change, preserved = judge_edit(edit, judge.objects(image)) if image is not None else (False, False)
        results.append(Result(edit, text, image, change, preserved, names_caption(text, edit.after.caption())))
    return results


def table(results: Sequence[Result], missing: Sequence[str] = ()) -> str:
    """The markdown table: one row per kind and "all"; a kind in `missing` (no edits in the split) gets dashes."""
    lines = ["| kind | edits | change made | preserved | both | caption right | image missing |",
             "|---|---|---|---|---|---|---|"]
    for kind in [*EDIT_KINDS, "all"]:
        rows = [r for r in results if kind in ("all", r.edit.kind)]
        if not rows:
            lines.append(f"| {kind} | 0 | – | – | – | – | – |")
            continue
        cols = [[r.change for r in rows], [r.preserved for r in rows], [r.change and r.preserved for r in rows],
                [r.caption for r in rows], [r.image is None for r in rows]]
        lines.append(f"| {kind} | {len(rows)} | " + " | ".join(f"{100 * np.mean(c):.1f}%" for c in cols) + " |")
    return "\n".join(lines)


def ceiling(judge: ShapeJudge, edits: Sequence[Edit]) -> str:
    """The same checks on the real renders of the scenes after the edits: what a perfect model would score."""
    verdicts = [judge_edit(e, judge.objects(e.after.render(judge.resolution))) for e in edits]
    both = sum(c and p for c, p in verdicts)
    wrong = sorted({e.kind for e, (c, p) in zip(edits, verdicts, strict=True) if not (c and p)})
    return (f"judge ceiling (the same checks on the real after renders): both {both}/{len(edits)} = "
            f"{100 * both / len(edits):.1f}%" + (f"; misread kinds: {', '.join(wrong)}" if wrong else ""))


def wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def tile(image: Image.Image | None, side: int, font: ImageFont.ImageFont) -> Image.Image:
    """An image upscaled to `side` (nearest), or a grey "no image" square."""
    if image is not None:
        return image.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
    blank = Image.new("RGB", (side, side), (96, 96, 96))
    ImageDraw.Draw(blank).text((side // 2, side // 2), "no image", fill=(255, 255, 255), font=font, anchor="mm")
    return blank


def write_grid(results: Sequence[Result], resolution: int, path: Path, per_kind: int = 2) -> None:
    """Two edits per kind: before | kind, instruction and reply text | the model's image | the real after."""
    font = ImageFont.load_default(size=14)
    chosen = [r for k in EDIT_KINDS for r in [r for r in results if r.edit.kind == k][:per_kind]]
    side, pad, head = resolution * SCALE, 6, 24
    widths = [side, TEXT_WIDTH, side, side]
    canvas = Image.new("RGB", (sum(widths) + pad * 5, head + len(chosen) * (side + pad) + pad), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    xs = [pad + sum(widths[:k]) + pad * k for k in range(4)]
    for x, w, title in zip(xs, widths, ("before", "instruction / reply", "model", "expected"), strict=True):
        draw.text((x + w // 2, head // 2 + 2), title, fill=(255, 255, 255), font=font, anchor="mm")
    for row, r in enumerate(chosen):
        y = head + pad + row * (side + pad)
        canvas.paste(tile(Image.fromarray(r.edit.before.render(resolution)), side, font), (xs[0], y))
        canvas.paste(tile(r.image, side, font), (xs[2], y))
        canvas.paste(tile(Image.fromarray(r.edit.after.render(resolution)), side, font), (xs[3], y))
        draw.rectangle((xs[1], y, xs[1] + TEXT_WIDTH - 1, y + side - 1), fill=(255, 255, 255))
        verdict = f"change {'yes' if r.change else 'no'}, preserved {'yes' if r.preserved else 'no'}"
        lines = [f"[{r.edit.kind}] {verdict}", *wrap(draw, f'"{r.edit.instruction}"', font, TEXT_WIDTH - 12),
                 *wrap(draw, f"reply: {r.text or '(no text)'}", font, TEXT_WIDTH - 12)]
        for k, line in enumerate(lines[: side // 18]):
            draw.text((xs[1] + 6, y + 4 + 18 * k), line, fill=(0, 0, 0) if k else (90, 90, 90), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def load(p: argparse.ArgumentParser, directory: str) -> Chat:
    """The model, or a clear argparse error: a directory that does not exist, is not a model, or draws grey."""
    if not model_directory(directory).is_dir():
        p.error(f"--model {directory}: no such directory (give the output directory of `mmgen train`, or a "
                f"bundled model: {', '.join(BUNDLED)})")
    try:
        chat = Chat.from_pretrained(directory)
    except FileNotFoundError as e:
        p.error(f"--model {directory}: {e}")
    if chat.model.config.image.channels != 3 or chat.image_size < 8:
        p.error(f"--model {directory}: draws {chat.model.config.image.channels}-channel {chat.image_size}×"
                f"{chat.image_size} images; editing shapes needs RGB images of at least 8×8")
    return chat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="edit-tiny",
                   help="model directory, or a bundled model: edit-tiny (the default), chat-tiny")
    p.add_argument("--per-kind", type=int, default=40, help="edits of each kind")
    p.add_argument("--split", choices=SPLITS, default="held_out", help="which edits (default: the held-out tenth)")
    p.add_argument("--seed", type=int, default=0, help="picks the edits (seed·1000 + i) and the model's seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", default=None, help="write editing_grid.png to this directory")
    p.add_argument("--guidance", type=float, default=None, help="override the model's guidance scale")
    p.add_argument("--image-steps", type=int, default=None, help="override the model's denoising steps")
    args = p.parse_args()
    if args.per_kind < 1 or args.seed < 0:
        p.error("--per-kind must be >= 1 and --seed >= 0")
    torch.set_num_threads(args.threads)
    chat = load(p, args.model)
    options = {k: v for k, v in (("guidance", args.guidance), ("image_steps", args.image_steps)) if v is not None}
    try:
        chat.options(**options)  # a value the model does not take, before any work
    except OptionError as e:
        p.error(str(e))
    judge = ShapeJudge(chat.image_size)
    edits, missing = sample_edits(args.per_kind, args.split, args.seed)
    if not edits:
        p.error(f"no {args.split} edits of any kind")
    t0 = time.perf_counter()
    replies = ask(chat, edits, args.seed, options)
    seconds = time.perf_counter() - t0
    results = judge_replies(judge, edits, replies)
    print(f"\n{args.model}: {args.per_kind} {args.split} edits per kind, "
          f"{chat.image_size}×{chat.image_size}" + "".join(f", {k} {v}" for k, v in options.items()) + "\n")
    print(table(results, missing))
    for kind in missing:
        print(f"\n{kind}: no {args.split} edits exist (no `{kind} ...` key of mmgen.data.edits hashes into the "
              f"{args.split} split), so none was asked")
    print(f"\n{ceiling(judge, edits)}")
    print(f"shape judge on {judge.resolution}×{judge.resolution}: {100 * judge.holdout_accuracy:.1f}% of 600 held-out "
          "real shapes")
    print(f"wall time: {seconds:.1f} s for {len(edits)} edits ({1000 * seconds / len(edits):.0f} ms per edit, "
          f"{args.threads} thread(s))")
    if args.docs:
        write_grid(results, chat.image_size, Path(args.docs) / "editing_grid.png")
        print(f"{Path(args.docs) / 'editing_grid.png'}: two edits per kind, before | instruction / reply | model | "
              "expected")


if __name__ == "__main__":
    main()
