"""Speed of two checkouts of mmgen measured in one run: a change against its parent.

    git worktree add ../mmgen-before HEAD~1
    python benchmarks/compare_trees.py ../mmgen-before .          # before, after
    python benchmarks/compare_trees.py ../mmgen-before . --rounds 3 --train-steps 300

For each tree (a fresh interpreter started inside the tree, so that its `mmgen` is the one imported;
checked) and each round,
alternating between the trees so that a busy machine slows both alike:
  - time to first image: the bundled chat model answers "draw a handwritten digit 7" with an image
    (`Chat.stream(..., image="always")`, 25 Euler steps, guidance 3), seconds from the call to the
    `ImageDone` event, best of `--repeats` after one warm-up, in a process that has already loaded the model;
  - training tokens/s: `python -m mmgen.train digits-tiny` for `--train-steps` steps (no checkpoints,
    samples or evaluation), tokens over the wall-clock of the logged steps after the first window.
Prints the median over rounds of each figure per tree and the ratio after / before.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FIRST_IMAGE = r"""
import json, time, torch, mmgen
from mmgen.chat import Chat, ImageDone
torch.manual_seed(0)
chat = Chat.from_pretrained()
messages = [{"role": "user", "content": "draw a handwritten digit 7"}]
def once():
    start = time.perf_counter()
    for event in chat.stream(messages, image="always", max_new_tokens=1):
        if isinstance(event, ImageDone):
            return time.perf_counter() - start
once()
print(json.dumps({"first_image_s": min(once() for _ in range(REPEATS)), "package": mmgen.__file__}))
"""


def run_python(tree: Path, args: list[str]) -> str:
    """`python ARGS` with the working directory and PYTHONPATH at `tree` (the working directory comes
    first on sys.path for `-c` and `-m`: started elsewhere, another checkout's mmgen could be imported)."""
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, *args], env=env, cwd=tree.resolve(), check=True, capture_output=True,
                          text=True)
    return done.stdout


def first_image_seconds(tree: Path, repeats: int) -> float:
    code = FIRST_IMAGE.replace("REPEATS", str(repeats))
    result = json.loads(run_python(tree, ["-c", code]).strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"measured {result['package']}, not the checkout {tree}")
    return result["first_image_s"]


def train_tokens_per_second(tree: Path, steps: int, every: int) -> float:
    with tempfile.TemporaryDirectory(prefix="mmgen-trees-") as out:
        run_python(tree, ["-m", "mmgen.train", "digits-tiny", f"--out={out}", f"--train.steps={steps}",
                          f"--log.every={every}", "--checkpoint.every=0", "--samples.every=0", "--eval.digits=0",
                          "--log.progress=false", "--log.tensorboard=false"])
        with (Path(out) / "train_log.csv").open() as f:
            rows = list(csv.DictReader(f))[1:]  # the first window includes start-up
    return sum(float(r["tokens"]) for r in rows) / sum(float(r["seconds"]) for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="checkout measured first (the baseline)")
    p.add_argument("after", type=Path, help="checkout with the change")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50, help="training log window (steps)")
    p.add_argument("--repeats", type=int, default=10, help="first-image timings per round (the best counts)")
    args = p.parse_args()
    trees = {"before": args.before, "after": args.after}
    for name, tree in trees.items():
        if not (tree / "mmgen" / "__init__.py").is_file():
            p.error(f"{name}: {tree} holds no mmgen package")
    figures = {name: {"first_image_s": [], "train_tokens_per_s": []} for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            figures[name]["first_image_s"].append(first_image_seconds(tree, args.repeats))
            figures[name]["train_tokens_per_s"].append(train_tokens_per_second(tree, args.train_steps, args.every))
            print(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(
                f"{k} {v[-1]:.3f}" for k, v in figures[name].items()), file=sys.stderr, flush=True)
    med = {name: {k: statistics.median(v) for k, v in f.items()} for name, f in figures.items()}
    print(f"\n{os.cpu_count()} CPU cores, median of {args.rounds} rounds\n")
    print("| figure | before | after | after / before |")
    print("|---|---|---|---|")
    for k, label, fmt in (("first_image_s", "time to first image (s)", "{:.3f}"),
                          ("train_tokens_per_s", "training tokens/s", "{:,.0f}")):
        b, a = med["before"][k], med["after"][k]
        print(f"| {label} | {fmt.format(b)} | {fmt.format(a)} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
