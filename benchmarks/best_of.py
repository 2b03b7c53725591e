"""Best-of-N self-verification against raising the guidance scale, judged by the bundled classifiers.

    python benchmarks/best_of.py                                   # the bundled model, 2 Euler steps, no guidance
    python benchmarks/best_of.py --model runs/digits-vq --grid ""  # a model from `mmgen train` (digits only)

For each model: "a handwritten digit d" (`--per-digit` per digit) judged by `mmgen.evaluation.DigitClassifier`,
and, for 16×16 RGB models, `--shapes` captions of held-out single-object shapes ("a purple square at the
top") judged on color (`classify_color`) and shape (the SVM of `benchmarks/chat_model.py`), right when
both are. Rows: best-of-N for N = 1, 2, 4, 8 without guidance (scale 1) and with `--steps` denoising
steps (diffusion interfaces), then plain drawing with a raised guidance scale (and, for diffusion, more
steps) to compare at equal wall time. Each cell: accuracy with its 95% Wilson interval and the wall
time per kept image (drawing and scoring, one thread). Ends with a markdown table; `--grid` writes
N = 1 beside best-of-8 for the digits.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from mmgen.assets import DEFAULT_MODEL
from mmgen.data.shapes import ShapesDataset, caption, classify_color
from mmgen.evaluation import DigitClassifier
from mmgen.files import save_image_grid
from mmgen.generation import GenerationOptions
from mmgen.pipeline import Pipeline
from mmgen.shape_judge import ShapeJudge, to_pixels

BEST_OF = (1, 2, 4, 8)


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion right / n."""
    p, d = right / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return mid - half, mid + half


class Task:
    """Prompts and a judge: `right(images)` -> (n,) booleans."""

    def __init__(self, name: str, prompts: list[str], right):
        self.name, self.prompts, self.right = name, prompts, right


def digit_task(pipe: Pipeline, per_digit: int) -> Task:
    c = pipe.model.config.image
    clf = DigitClassifier(c.channels, c.resolution)
    labels = np.repeat(np.arange(10), per_digit)
    return Task("digits", [f"a handwritten digit {d}" for d in labels], lambda ims: clf.predict(ims) == labels)


def shape_task(pipe: Pipeline, n: int) -> Task:
    judge = ShapeJudge(pipe.model.config.image.resolution)
    held = ShapesDataset(size=n, resolution=pipe.model.config.image.resolution, max_objects=1, seed=999)
    objects = [held.objects(i)[0] for i in range(n)]

    def right(images: torch.Tensor) -> np.ndarray:  # (n, 3, H, W)
        color = [classify_color(to_pixels(im)) == o.color for im, o in
                 zip(images, objects)]
        shape = [s == o.shape for s, o in zip(judge.shape(images), objects, strict=True)]
        return np.array(color) & np.array(shape)

    return Task("shapes", [caption([o]) for o in objects], right)


def cell(pipe: Pipeline, task: Task, opts: GenerationOptions) -> tuple[dict, torch.Tensor]:
    """Draw the task's prompts (best-of-N when opts.best_of > 1), judge them; the figures and the images."""
    start = time.perf_counter()
    images = torch.stack(pipe.draw(task.prompts, opts, seed=0))  # (n, C, H, W)
    seconds = time.perf_counter() - start
    right = task.right(images)
    lo, hi = wilson(int(right.sum()), len(right))
    return {"acc": float(right.mean()), "lo": lo, "hi": hi, "ms": 1000 * seconds / len(right), "n": len(right)}, images


def settings(diffusion: bool, steps: int) -> list[tuple[str, dict]]:
    """(label, GenerationOptions fields) of each row: best-of-N unguided, then guided plain drawing."""
    base = {"image_steps": steps} if diffusion else {}
    rows = [(f"best-of-{n}, guidance 1", {**base, "guidance": 1.0, "best_of": n}) for n in BEST_OF]
    rows += [(f"guidance {w:g}", {**base, "guidance": w}) for w in (2.0, 3.0, 5.0)]
    if diffusion:  # more time for guidance: more steps as well
        rows += [(f"guidance 3, {s} steps", {"image_steps": s, "guidance": 3.0}) for s in (2 * steps, 4 * steps)]
    return rows


def run_model(directory: str, args) -> tuple[list[str], dict]:
    pipe = Pipeline.from_pretrained(directory)
    c = pipe.model.config.image
    tasks = [digit_task(pipe, args.per_digit)]
    if c.channels == 3 and args.shapes:
        tasks.append(shape_task(pipe, args.shapes))
    diffusion = c.interface == "diffusion"
    pipe.draw(tasks[0].prompts[:8], GenerationOptions(guidance=1.0), seed=0)  # warm-up
    table, grids = {}, {}
    for label, fields in settings(diffusion, args.steps):
        opts = GenerationOptions(**fields)
        for task in tasks:
            table[label, task.name], images = cell(pipe, task, opts)
            if task.name == "digits" and opts.best_of in (1, 8) and opts.guidance.scale == 1.0:
                grids[opts.best_of] = images
            f = table[label, task.name]
            print(f"{directory} | {label} | {task.name}: {100 * f['acc']:.1f}% [{100 * f['lo']:.1f}, "
                  f"{100 * f['hi']:.1f}] | {f['ms']:.1f} ms/image", flush=True)
    return [t.name for t in tasks], {"table": table, "grids": grids, "steps": args.steps if diffusion else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, help="model directory (repeatable; default: bundled)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of the unguided rows (diffusion)")
    p.add_argument("--per-digit", type=int, default=30)
    p.add_argument("--shapes", type=int, default=180, help="held-out shape captions (16×16 RGB models; 0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default="docs/best_of_grid.png", help="N = 1 | best-of-8 digits grid ('' : none)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    for directory in args.model or [str(DEFAULT_MODEL)]:
        names, res = run_model(directory, args)
        steps = f", {res['steps']} step(s) unless stated" if res["steps"] else ""
        print(f"\n{directory}{steps}; accuracy [95% interval], ms per image (1 thread)\n")
        print("| setting | " + " | ".join(f"{n} acc | {n} ms/img" for n in names) + " |")
        print("|---|" + "---|---|" * len(names))
        for label in dict.fromkeys(k[0] for k in res["table"]):
            cells = [res["table"][label, n] for n in names]
            print(f"| {label} | " + " | ".join(f"{100 * f['acc']:.1f}% [{100 * f['lo']:.0f}–{100 * f['hi']:.0f}] | "
                                               f"{f['ms']:.1f}" for f in cells) + " |")
        if args.grid and len(res["grids"]) == 2:
            per = args.per_digit
            one, eight = (res["grids"][k].view(10, per, *res["grids"][k].shape[1:])[:, :8] for k in (1, 8))
            gap = -torch.ones_like(one[:, :1])  # a black column between the halves
            save_image_grid(torch.cat([one, gap, eight], 1), args.grid, scale=4, pad=1)
            print(f"\n{args.grid}: rows 0-9; left N = 1, right best-of-8 (the first 8 images of each digit)")
            args.grid = ""  # the first model's only
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
