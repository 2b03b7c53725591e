"""Image editing pairs over the procedural shapes: (image, instruction) -> the changed image, as chats.

    user:      [image of a red circle in the center] "make the circle blue"
    assistant: "here is a blue circle in the center." [image of a blue circle in the center]

Five kinds of edit, each on one or two objects (`mmgen.data.shapes`):

    recolor   "make the circle blue"            one object changes color
    reshape   "turn the square into a circle"   one object changes shape
    move      "move the triangle to the top"    one object changes cell
    add       "add a green square on the left"  one object more (the count goes up)
    remove    "remove the red circle"           one object less (the count goes down)

The assistant first names the whole result (the caption of the new scene), then draws it: the drawing
is conditioned on the shown image and on that caption. Objects that an edit does not touch keep their
exact pixels (each object is rendered with its own jitter, see `Scene.render`). A conversation may
continue with a second edit of the drawn image ("now move it to the top").

Held out: a tenth of the edits of each kind, by what they change (`Edit.key`, e.g. "recolor circle
red->blue": the tenth of each kind's keys with the smallest SHA-256), never appears in `split="train"`
items; `split="held_out"` gives only those. `benchmarks/editing.py` measures the model on them.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from mmgen.chat_template import Message
from mmgen.data.images import fit_array
from mmgen.data.shapes import _PHRASES, COLORS, POSITIONS, SHAPES, ShapeObject, caption, render
from mmgen.data.source import Source

EDIT_KINDS = ("recolor", "reshape", "move", "add", "remove")
SPLITS = ("train", "held_out")
HELD_OUT_SHARE = 0.1

RECOLOR = ("make the {ref} {color}", "color the {ref} {color}", "change the {ref} to {color}",
           "paint the {ref} {color}", "make it {color}")
RESHAPE = ("turn the {ref} into a {shape}", "make the {ref} a {shape}", "replace the {ref} with a {color} {shape}",
           "change it to a {shape}")
MOVE = ("move the {ref} {where}", "put the {ref} {where}", "move it {where}", "shift the {ref} {where}")
ADD = ("add {thing}", "also draw {thing}", "put {thing} in it", "add {thing} too")
REMOVE = ("remove the {ref}", "delete the {ref}", "take away the {ref}", "erase the {ref}")
ANSWER = ("here is {x}.", "done: {x}.", "ok, {x}.", "sure! here is {x}.")
AGAIN = ("now {instruction}", "and {instruction}", "{instruction}")
_MOVE_PHRASES = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom",
                 "center": "to the center"}


@dataclass(frozen=True)
class Scene:
    """Objects with a jitter seed each: an object keeps its exact look while the others change."""

    objects: tuple[ShapeObject, ...]
    jitter: tuple[int, ...]

    def render(self, resolution: int) -> np.ndarray:
        """(resolution, resolution, 3) uint8; each object drawn alone with its own jitter, then composited
        (the cells never overlap, so the max of the layers is the layered image)."""
        image = np.zeros((resolution, resolution, 3), dtype=np.uint8)
        for obj, seed in zip(self.objects, self.jitter, strict=True):
            image = np.maximum(image, render([obj], resolution, np.random.default_rng(seed)))
        return image

    def caption(self) -> str:
        return caption(self.objects)


@dataclass(frozen=True)
class Edit:
    """One edit: the scene before, the instruction, the scene after; `key` is what the split hashes."""

    kind: str
    before: Scene
    instruction: str
    after: Scene
    key: str


def _all_keys() -> dict[str, list[str]]:
    """Every possible `Edit.key`, by kind (what `_propose` writes)."""
    colors, moves = tuple(COLORS), [(a, b) for a in POSITIONS for b in POSITIONS if a != b]
    objects = [f"{c} {s} {p}" for c in colors for s in SHAPES for p in POSITIONS]
    return {"recolor": [f"recolor {s} {a}->{b}" for s in SHAPES for a in colors for b in colors if a != b],
            "reshape": [f"reshape {c} {a}->{b}" for c in colors for a in SHAPES for b in SHAPES if a != b],
            "move": [f"move {s} {a}->{b}" for s in SHAPES for a, b in moves],
            "add": [f"add {o}" for o in objects], "remove": [f"remove {o}" for o in objects]}


def _held_out_keys() -> frozenset[str]:
    """Per kind, the ceil(10%) of its keys with the smallest SHA-256: every kind has held-out edits."""
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    return frozenset(k for keys in _all_keys().values()
                     for k in sorted(keys, key=digest)[:math.ceil(HELD_OUT_SHARE * len(keys))])


ALL_KEYS = frozenset(k for keys in _all_keys().values() for k in keys)
HELD_OUT_KEYS = _held_out_keys()


def held_out(key: str) -> bool:
    """Whether an edit's key is in the held-out tenth (raises for a key no edit has)."""
    if key not in ALL_KEYS:
        raise ValueError(f"{key!r} is not an edit key")
    return key in HELD_OUT_KEYS


def _article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def _reference(obj: ShapeObject, others: Sequence[ShapeObject], rng: random.Random) -> str:
    """The shortest name that singles `obj` out among `others` ("circle", "red circle", "circle on the left")."""
    if all(o.shape != obj.shape for o in others):
        return rng.choice((obj.shape, f"{obj.color} {obj.shape}"))
    if all((o.color, o.shape) != (obj.color, obj.shape) for o in others):
        return f"{obj.color} {obj.shape}"
    return f"{obj.shape} {_PHRASES[obj.position]}"


def _random_object(rng: random.Random, free: Sequence[str]) -> ShapeObject:
    return ShapeObject(rng.choice(tuple(COLORS)), rng.choice(SHAPES), rng.choice(tuple(free)))


def _propose(kind: str, scene: Scene, rng: random.Random) -> Edit | None:
    """A random edit of `kind` on `scene`, or None when the scene does not allow it (e.g. add to a full one)."""
    objs = list(scene.objects)
    k = rng.randrange(len(objs))
    obj, others = objs[k], objs[:k] + objs[k + 1:]
    ref = _reference(obj, others, rng)
    templates = {"recolor": RECOLOR, "reshape": RESHAPE, "move": MOVE, "add": ADD, "remove": REMOVE}[kind]
    template = rng.choice([t for t in templates if len(objs) == 1 or "it" not in t.split()])
    if kind in ("recolor", "reshape", "move"):
        field, pool = {"recolor": ("color", tuple(COLORS)), "reshape": ("shape", SHAPES),
                       "move": ("position", [p for p in POSITIONS if p not in {o.position for o in objs}])}[kind]
        choices = [v for v in pool if v != getattr(obj, field)]
        if not choices:
            return None
        new = replace(obj, **{field: rng.choice(choices)})
        objs[k] = new
        instruction = template.format(ref=ref, color=new.color, shape=new.shape, where=_MOVE_PHRASES[new.position])
        subject = obj.color if kind == "reshape" else obj.shape  # recolor circle red->blue, reshape red circle->square
        key = f"{kind} {subject} {getattr(obj, field)}->{getattr(new, field)}"
        return Edit(kind, scene, instruction, Scene(tuple(objs), scene.jitter), key)
    if kind == "add":
        free = [p for p in POSITIONS if p not in {o.position for o in objs}]
        new = _random_object(rng, free)
        thing = f"{_article(new.color)} {new.color} {new.shape} {_PHRASES[new.position]}"
        after = Scene((*objs, new), (*scene.jitter, rng.randrange(2**31)))
        return Edit(kind, scene, template.format(thing=thing), after, f"add {new.color} {new.shape} {new.position}")
    if len(objs) < 2:  # remove: never leave an empty image
        return None
    after = Scene(tuple(others), scene.jitter[:k] + scene.jitter[k + 1:])
    return Edit(kind, scene, template.format(ref=ref), after, f"remove {obj.color} {obj.shape} {obj.position}")


def sample_scene(rng: random.Random, count: int) -> Scene:
    """`count` random objects in distinct cells, each with its own jitter seed."""
    positions = rng.sample(POSITIONS, count)
    objects = tuple(_random_object(rng, [p]) for p in positions)
    return Scene(objects, tuple(rng.randrange(2**31) for _ in objects))


def sample_edit(rng: random.Random, split: str = "train", scene: Scene | None = None,
                kinds: Sequence[str] = EDIT_KINDS) -> Edit:
    """A random edit of one of `kinds` on `scene` (default: a random scene of 1-2 objects) with at most two
    objects after it, whose key lies in
    `split` ("train": the nine tenths of each kind, "held_out": the tenth)."""
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}: one of {SPLITS}")
    for _ in range(1000):
        kind = rng.choice(tuple(kinds))  # a fresh scene has as many objects as the kind needs: 1 to add, 2 to remove
        base = scene or sample_scene(rng, {"add": 1, "remove": 2}.get(kind) or rng.randint(1, 2))
        edit = _propose(kind, base, rng)
        if edit is not None and len(edit.after.objects) <= 2 and held_out(edit.key) == (split == "held_out"):
            return edit
    raise ValueError(f"no {split} edit of kinds {tuple(kinds)} found for {scene}")


def _style(text: str, rng: random.Random) -> str:
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    return text + rng.choice((".", "!", "", ""))


class EditSource(Source):
    """`n` editing conversations per epoch: an image and an instruction, the answer's caption and image;
    a quarter of them go on with a second edit of the drawn image. Every item is drawn from the per-item
    `rng` (as the dialogues are), so it differs from epoch to epoch and is reproducible.

    Args:
        n: items per epoch.
        channels, resolution: the model's image format.
        split: "train" (the default) or "held_out" edits.
        loss_on: "all" (LM labels on every text token) or "assistant" (on assistant turns only).
    """

    name = "edits"

    def __init__(self, n: int, channels: int, resolution: int, split: str = "train", loss_on: str = "all"):
        if split not in SPLITS:
            raise ValueError(f"split = {split!r}: an edits source takes {SPLITS}")
        self.n, self.channels, self.resolution = n, channels, resolution
        self.split, self.loss_on = split, loss_on

    def image(self, scene: Scene) -> torch.Tensor:
        """The scene as the model's (channels, resolution, resolution) float image in [-1, 1]."""
        return fit_array(scene.render(max(self.resolution, 8)), self.channels, self.resolution)

    def turn(self, edit: Edit, rng: random.Random, image_in_prompt: bool, again: bool = False) -> list[Message]:
        instruction = rng.choice(AGAIN).format(instruction=edit.instruction) if again else edit.instruction
        text = _style(instruction, rng)
        user = ([self.image(edit.before), text] if rng.random() < 0.8 else [text, self.image(edit.before)]) \
            if image_in_prompt else [text]
        answer = rng.choice(ANSWER).format(x=edit.after.caption())
        return [Message("user", user), Message("assistant", [answer, self.image(edit.after)])]

    def sample(self, i: int, rng: random.Random) -> list[Message]:
        edit = sample_edit(rng, self.split)
        messages = self.turn(edit, rng, image_in_prompt=True)
        if rng.random() < 0.25:
            second = sample_edit(rng, self.split, scene=edit.after)
            messages += self.turn(second, rng, image_in_prompt=False, again=True)
        return messages

    def texts(self) -> Iterator[str]:
        """Every phrase the conversations use (for training the text tokenizer), without drawing images."""
        rng = random.Random(0)
        for _ in range(min(self.n, 4000)):
            edit = sample_edit(rng, self.split)
            yield _style(rng.choice(AGAIN).format(instruction=edit.instruction), rng)
            yield rng.choice(ANSWER).format(x=edit.after.caption())
