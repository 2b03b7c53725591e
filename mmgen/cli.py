"""`mmgen train | generate | caption`: the command-line entry points."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmgen.diffusion.samplers import SAMPLERS

DEFAULT_RUN = "runs/digits-tiny"


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_RUN, help=f"model directory (default: {DEFAULT_RUN}, made by `mmgen train`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    p.add_argument("--sampler", default="euler", choices=sorted(SAMPLERS))
    p.add_argument("--schedule", default="uniform", choices=["uniform", "karras"])
    p.add_argument("--shift", default="1.0", help="flow shift of the uniform schedule, or 'auto' (from the token count)")
    p.add_argument("--eta", type=float, default=None, help="noise of ddim / dpmpp_2m_sde (default: theirs)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale w (1 = off)")
    p.add_argument("--guidance-kind", default="cfg", choices=["cfg", "apg"])
    p.add_argument("--apg-eta", type=float, default=1.0, help="APG weight of the parallel component")
    p.add_argument("--apg-norm", type=float, default=0.0, help="APG norm cap r (0 = none)")
    p.add_argument("--apg-momentum", type=float, default=0.0, help="APG momentum β")
    p.add_argument("--rescale", type=float, default=0.0, help="CFG rescale φ")
    p.add_argument("--threshold", default=None, choices=["imagen", "mimic"], help="dynamic thresholding")
    p.add_argument("--interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="guide only for σ in this range")
    p.add_argument("--cache-threshold", type=float, default=0.0, help="First Block Cache τ (0 = off)")
    p.add_argument("--temperature", type=float, default=None, help="text temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)


def _options(args, **overrides):
    from mmgen.generation import GenerationOptions

    from mmgen.diffusion.guidance import Guidance

    guidance = Guidance(
        scale=args.guidance, kind=args.guidance_kind, eta=args.apg_eta, norm_threshold=args.apg_norm,
        momentum=args.apg_momentum, rescale=args.rescale, threshold=args.threshold,
        interval=tuple(args.interval) if args.interval else None,
    )
    kw = dict(image_steps=args.steps, sampler=args.sampler, schedule=args.schedule,
              shift=args.shift if args.shift == "auto" else float(args.shift), eta=args.eta,
              guidance=guidance, cache_threshold=args.cache_threshold, top_p=args.top_p, top_k=args.top_k)
    if args.temperature is not None:
        kw["temperature"] = args.temperature
    return GenerationOptions(**{**kw, **overrides})


def _load(directory: str):
    from mmgen.pipeline import Pipeline

    if not Path(directory).is_dir():
        raise SystemExit(f"error: model directory {directory} not found; train one with `mmgen train --out {directory}`")
    return Pipeline.from_pretrained(directory)


def cmd_train(args) -> None:
    import torch

    from mmgen.evaluation import evaluate_digits
    from mmgen.train.digits import train_digits
    from mmgen.train.loop import TrainOptions

    torch.set_num_threads(args.threads) if args.threads else None
    opts = TrainOptions(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"training the {args.preset} preset on the bundled digits for {opts.steps} steps -> {args.out}")
    model, tokenizer, log = train_digits(args.out, args.preset, args.objective, opts)
    print(f"trained {model.num_parameters() / 1e6:.2f}M parameters in {log[-1]['train_seconds']:.0f} s; "
          f"final loss {log[-1]['loss']:.4f} (lm {log[-1]['lm']:.4f}, image {log[-1]['image']:.4f})")
    results = evaluate_digits(args.out, args.eval_per_digit, grid=Path(args.out) / "digits_grid.png")
    (Path(args.out) / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def cmd_generate(args) -> None:
    import torch

    from mmgen.pipeline import to_pil

    pipe = _load(args.model)
    with _progress(args.steps, "denoise") as tick:  # the n images denoise together, one tick per step
        images = pipe.draw([args.prompt] * args.n, _options(args), seed=args.seed, progress=tick)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.n == 1:
        to_pil(images[0], args.scale).save(out)
        print(out)
    elif args.grid:
        from mmgen.evaluation import save_grid

        save_grid(torch.stack(images)[None], out, scale=args.scale)
        print(out)
    else:
        for i, img in enumerate(images):
            path = out.with_name(f"{out.stem}_{i}{out.suffix}")
            to_pil(img, args.scale).save(path)
            print(path)


def cmd_caption(args) -> None:
    pipe = _load(args.model)
    for path, text in zip(args.images, pipe.caption(args.images, _options(args, max_new_tokens=args.max_new_tokens,
                                                                              temperature=args.temperature or 0.0,
                                                                              max_images=0))):
        print(f"{path}\t{text}")


class _progress:
    """A tqdm bar driven by the engine's per-step callback."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())

    def __enter__(self):
        return lambda info: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the tiny model on the bundled digits, then evaluate it")
    p.add_argument("--out", default=DEFAULT_RUN)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--objective", default="flow", choices=["eps", "v", "flow"])
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--eval-per-digit", type=int, default=10, help="images generated per digit for the evaluation")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="draw images from a caption")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png")
    p.add_argument("-n", type=int, default=1, help="number of images")
    p.add_argument("--grid", action="store_true", help="save the n images as one grid")
    p.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling of the saved PNG")
    _sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("caption", help="caption image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--max-new-tokens", type=int, default=24)
    _sampling_args(p)
    p.set_defaults(fn=cmd_caption)

    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.command == "train":
        print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
