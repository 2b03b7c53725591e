"""Training throughput of `mmgen train` on this machine: one process against two (accelerate, gloo).

    python benchmarks/train_throughput.py                  # digits-tiny, 300 steps each way
    python benchmarks/train_throughput.py --steps 600 --config shapes-tiny

Runs the same config for the same steps and global batch, first as one process (`python -m
mmgen.train`), then as two (`accelerate launch --multi_gpu --num_processes 2 -m mmgen.train`), each
process with cores / processes torch threads. Reads each run's train_log.csv and prints tokens/s
(real tokens, image slots included, over the wall-clock of the logged steps; the first logged
window, which holds start-up, is left out), padding, and the two-process / one-process ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(launcher: list[str], config: str, out: Path, steps: int, every: int, extra: list[str]) -> tuple[dict, float]:
    cmd = [*launcher, "-m", "mmgen.train", config, f"--out={out}", f"--train.steps={steps}", f"--log.every={every}",
           "--checkpoint.every=0", "--samples.every=0", "--eval.digits=0", "--log.progress=false",
           "--log.tensorboard=false", *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - start
    with (out / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))[1:]  # the first window includes start-up
    tokens = sum(float(r["tokens"]) for r in rows)
    seconds = sum(float(r["seconds"]) for r in rows)
    return {"tokens_per_s": tokens / seconds, "padding": sum(float(r["padding"]) for r in rows) / len(rows),
            "final_loss": float(rows[-1]["loss"])}, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="digits-tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50, help="log window (steps)")
    p.add_argument("--out", default=None, help="run directories go here (default: a temporary directory)")
    p.add_argument("extra", nargs="*", help="more --key=value overrides for both runs")
    args = p.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="mmgen-throughput-"))
    launchers = {
        "1 process": [sys.executable],
        "2 processes (gloo)": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    }
    results = {}
    for i, (name, launcher) in enumerate(launchers.items()):
        results[name] = run(launcher, args.config, root / f"run{i}", args.steps, args.every, args.extra)
    base = results["1 process"][0]["tokens_per_s"]
    print(f"\n{args.config}, {args.steps} steps, {os.cpu_count()} CPU cores, torch threads = cores / processes\n")
    print("| launch | tokens/s | × 1 process | padding | wall-clock | final loss |")
    print("|---|---|---|---|---|---|")
    for name, (r, wall) in results.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | {100 * r['padding']:.1f}% | "
              f"{wall:.0f} s | {r['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
