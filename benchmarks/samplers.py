"""Sampler quality against model calls, and First Block Cache speed-up, on the trained digits model.

    python benchmarks/digits.py            # once: trains runs/digits-tiny
    python benchmarks/samplers.py          # then this

For each sampler and step count: prompted-class accuracy of 200 generated digits (20 per class,
judged by an SVM trained on real digits) and the Fréchet distance between generated and the 297
held-out real digits in pixel space (64-d; FD, lower is better), with CFG scale 3. Then First
Block Cache at several thresholds τ: wall time, speed-up against τ = 0 in the same run, the share
of row-steps that reused their cache and of steps skipped for the whole batch, and the accuracy
and FD it costs.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy import linalg

from mmgen.data.digits import DigitsDataset
from mmgen.evaluation import DigitClassifier, generate_digits, prompted_accuracy
from mmgen.generation import GenerationOptions
from mmgen.pipeline import Pipeline

CALLS = {"euler": lambda n: n, "ddim": lambda n: n, "dpmpp_2m": lambda n: n, "dpmpp_2m_sde": lambda n: n,
         "heun": lambda n: 2 * n - 1}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of vectors (rows)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    eye = 1e-6 * np.eye(a.shape[1])  # border pixels of digits are constant: keep the covariances invertible
    s1, s2 = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def measure(pipe, clf, real, per_digit, **opts) -> tuple[float, float, float]:
    start = time.perf_counter()
    images = generate_digits(pipe, per_digit, GenerationOptions(**opts))
    seconds = time.perf_counter() - start
    fd = frechet(images.flatten(0, 1).flatten(1).numpy(), real)
    return prompted_accuracy(images, clf), fd, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/digits-tiny")
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--samplers", nargs="*", default=["euler", "dpmpp_2m", "heun", "dpmpp_2m_sde"],
                   help="give none to measure only First Block Cache")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 25, 50])
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 1.0])
    p.add_argument("--cache-steps", type=int, default=50)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; model {args.model}")
    pipe, clf = Pipeline.from_pretrained(args.model), DigitClassifier()
    real = DigitsDataset("test").images.flatten(1).numpy()

    print("\n| guidance | sampler | steps | model calls | prompted-class accuracy | pixel FD | seconds |")
    print("|---|---|---|---|---|---|---|")
    for guidance, sampler, steps in ((g, s, n) for g in args.guidance for s in args.samplers for n in args.steps):
        schedule = "karras" if sampler == "heun" else "uniform"  # Heun's trapezoid blows up on a σ = 999 first step
        acc, fd, sec = measure(pipe, clf, real, args.per_digit, sampler=sampler, image_steps=steps,
                               guidance=guidance, schedule=schedule)
        print(f"| {guidance} | {sampler} ({schedule}) | {steps} | {CALLS[sampler](steps)} | {acc:.3f} | {fd:.2f} "
              f"| {sec:.1f} |", flush=True)

    print(f"\nFirst Block Cache, Euler, {args.cache_steps} steps, CFG 3:\n")
    print("| τ | seconds | speed-up | row hit rate | steps skipped | prompted-class accuracy | pixel FD |")
    print("|---|---|---|---|---|---|---|")
    measure(pipe, clf, real, args.per_digit, image_steps=args.cache_steps, guidance=3.0)  # warm-up, not timed
    base = None
    for tau in args.thresholds:
        acc, fd, sec = measure(pipe, clf, real, args.per_digit, image_steps=args.cache_steps, guidance=3.0,
                               cache_threshold=tau)
        base = base or sec
        fbc = pipe.engine.step_cache
        hit, skip = (fbc.hit_rate, fbc.skip_rate) if fbc else (0.0, 0.0)
        print(f"| {tau} | {sec:.2f} | {base / sec:.2f}× | {hit:.2f} | {skip:.2f} | {acc:.3f} | {fd:.2f} |", flush=True)


if __name__ == "__main__":
    main()
