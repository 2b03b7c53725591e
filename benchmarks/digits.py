"""Train the bundled default job through the trainer under a CPU budget, then measure both directions.

    python benchmarks/digits.py                            # train (3,000 steps: `mmgen train`) + evaluate
    python benchmarks/digits.py --model runs/digits-tiny   # evaluate an existing model
    python benchmarks/digits.py --train-steps 5 --out runs/digits-smoke --per-digit 2   # a quick check
    python benchmarks/digits.py --interface discrete --image-tokenizer runs/tokenizers/digits-vq --out runs/digits-vq
    python benchmarks/digits.py --seeds 0 1 2 --threads 1        # three seeds (OUT-seed0, ...): mean and spread
    python benchmarks/digits.py --set data.sources.0.p_image_first=0.3   # any other config key
    python benchmarks/digits.py --set resume=latest          # continue the run in --out (a new run there is refused)

Training is `mmgen train digits-tiny` (`mmgen.train.trainer`) with the flags below as overrides
(--out, --objective, --interface, --image-tokenizer, --train-steps, --threads, --set) and its own
evaluation off: this script measures. Prints a markdown table: prompted-class accuracy of generated
digits (an SVM trained on real digits judges them), caption accuracy on the 297 held-out real
digits, and wall-clock times; writes the digit grid (one row per class) to --grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mmgen.errors import CheckpointError, ConfigError, DataError, TrainingError
from mmgen.evaluation import evaluate_digits
from mmgen.generation import GenerationOptions
from mmgen.interfaces.registry import INTERFACES
from mmgen.train.config import load_config
from mmgen.train.tracking import read_log
from mmgen.train.trainer import run


def train(args: argparse.Namespace, out: str, seed: int) -> str:
    """Run the default job with the command's overrides; returns the model directory."""
    overrides = {"out": out, "seed": seed, "model.diffusion.objective": args.objective,
                 "model.image.interface": args.interface, "model.image_tokenizer": args.image_tokenizer,
                 "train.steps": args.train_steps, "train.threads": args.threads, "eval.digits": 0}
    if args.interface != "diffusion":  # the job's conv patch encoder is the diffusion interface's
        overrides["model.image.patch_encoder"] = "linear"
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE, e.g. data.sources.0.p_image_first=0.3")
        overrides[key] = value
    start = time.perf_counter()
    try:
        out = run(load_config("digits-tiny", overrides))
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        raise SystemExit(f"error: {e}") from None
    minutes = (time.perf_counter() - start) / 60
    print(f"trained {args.train_steps} steps in {minutes:.1f} min; last log row: {json.dumps(read_log(out)[-1])}")
    return str(out)


def evaluate(model_dir: str, args: argparse.Namespace, label: str) -> list[dict]:
    """One table row per (guidance, steps): prompted-class and caption accuracy, times; the last writes the grid."""
    rows = []
    for g in args.guidance:
        for steps in args.image_steps:
            grid = args.grid if (g, steps) == (args.guidance[-1], args.image_steps[-1]) else None
            r = evaluate_digits(model_dir, args.per_digit, GenerationOptions(guidance=g, image_steps=steps), grid=grid)
            rows.append({"guidance": g, "steps": steps, **r})
            print(row(label, rows[-1]), flush=True)
    return rows


def row(label: str, r: dict) -> str:
    return (f"| {label} | {r['guidance']} | {r['steps']} | {r['prompted_class_accuracy']:.3f} ({r['images']} images) | "
            f"{r['caption_accuracy']:.3f} ({r['held_out_digits']} digits) | {r['generation_seconds']} | "
            f"{r['caption_seconds']} |")


def print_spread(results: dict[int, list[dict]]) -> None:
    """Mean and spread (min-max) over the seeds, per guidance, of both accuracies."""
    print("\n| guidance | prompted-class accuracy: mean (min-max) | caption accuracy: mean (min-max) |")
    print("|---|---|---|")
    for i, first in enumerate(next(iter(results.values()))):
        cells = []
        for key in ("prompted_class_accuracy", "caption_accuracy"):
            values = [rows[i][key] for rows in results.values()]
            cells.append(f"{100 * sum(values) / len(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f}%)")
        print(f"| {first['guidance']} | {cells[0]} | {cells[1]} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="evaluate this model directory instead of training one")
    p.add_argument("--out", default="runs/digits-tiny", help="run directory (with --seeds: OUT-seedN each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train one run per seed (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override")
    p.add_argument("--objective", default="flow", choices=["eps", "v", "flow"])
    p.add_argument("--interface", default="diffusion", choices=sorted(INTERFACES))
    p.add_argument("--image-tokenizer", help="trained image tokenizer directory (discrete and hybrid need one)")
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--grid", default="docs/digits_grid.png")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--image-steps", type=int, nargs="+", default=[None],
                   help="denoising steps (default: 25 in the backbone, the MLP head's own for hybrid/mar)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 when other jobs share the cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    several = len(args.seeds) > 1
    header = ("\n| seed | guidance | steps | prompted-class accuracy | caption accuracy | generation s | caption s |\n"
              "|---|---|---|---|---|---|---|")
    results = {}
    for seed in [0] if args.model else args.seeds:  # each seed measured as soon as it is trained
        model_dir = args.model or train(args, f"{args.out}-seed{seed}" if several else args.out, seed)
        print(header)
        results[seed] = evaluate(model_dir, args, str(seed))
    if several:
        print(header)
        for seed, rows in results.items():
            for r in rows:
                print(row(str(seed), r))
        print_spread(results)
    print(f"\ngrid: {args.grid}")


if __name__ == "__main__":
    main()
