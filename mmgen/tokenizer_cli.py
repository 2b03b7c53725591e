"""`mmgen train-tokenizer` and `mmgen compare-tokenizers`: train image tokenizers and compare them on the
same held-out images (`mmgen.train.tokenizer`, `mmgen.compare`)."""

from __future__ import annotations

from pathlib import Path

from mmgen.arguments import integer, positive
from mmgen.errors import OptionError
from mmgen.outputs import check_output_dir, check_output_file
from mmgen.sampling import MAX_SEED


def cmd_train_tokenizer(args) -> None:
    """`mmgen train-tokenizer --kind KIND --data DATA`: train and save an image tokenizer."""
    import torch

    from mmgen.train.tokenizer import source_defaults, source_images, tokenizer_config, train_image_tokenizer

    out = check_output_dir(args.out or f"runs/tokenizers/{Path(args.data).name}-{args.kind}", "--out")
    torch.set_num_threads(args.threads) if args.threads else None
    d = source_defaults(args.data)
    pick = {k: getattr(args, k) if getattr(args, k) is not None else d[k] for k in d}
    if args.kind == "vae":
        pick["codebook_size"] = 0
    train = source_images(args.data, "train", pick["resolution"], pick["channels"])
    test = source_images(args.data, "test", pick["resolution"], pick["channels"], limit=1000)
    config = tokenizer_config(kind=args.kind, channels=train.shape[1], resolution=train.shape[-1],
                              **{k: pick[k] for k in ("latent_channels", "downsample", "codebook_size", "width",
                                                      "res_blocks")})
    print(f"training a {args.kind} tokenizer on {len(train)} {args.data} images ({config.grid}×{config.grid} = "
          f"{config.grid ** 2} tokens per image) for {pick['steps']} steps"
          f"{f' or {args.max_minutes} min' if args.max_minutes else ''} -> {out}")
    train_image_tokenizer(config, train, out, steps=pick["steps"], batch_size=pick["batch_size"], lr=pick["lr"],
                          max_minutes=args.max_minutes, seed=args.seed, eval_images=test)
    print((out / "train_summary.json").read_text())


def cmd_compare_tokenizers(args) -> None:
    """`mmgen compare-tokenizers DIR_OR_KIND...`: the comparison table, JSON and PNG grid."""
    import torch

    from mmgen.compare import compare_tokenizers, render_markdown

    if args.generation and args.data != "digits":
        raise OptionError("--generation measures prompted-class accuracy on the digits: use --data digits")
    check_output_dir(args.out, "--out")
    if args.grid is not None:
        check_output_file(args.grid, "--grid")
    torch.set_num_threads(args.threads) if args.threads else None
    specs = list(dict.fromkeys(s.partition(":")[0] for s in args.tokenizers))  # "DIR:interface" -> DIR
    rows = compare_tokenizers(specs, args.data, args.out, held_out=args.held_out, steps=args.steps,
                              max_minutes=args.max_minutes, grid_path=args.grid)
    if args.generation:
        from mmgen.compare_generation import compare_generation

        recon = {r["tokenizer"]: r for r in rows}
        rows = [{**recon.get(g["tokenizer"], {}), **g} for g in compare_generation(
            args.tokenizers, Path(args.out) / "generation", steps=args.generation_steps, per_digit=args.per_digit)]
    print(render_markdown(rows))
    print(f"\n{Path(args.out) / 'comparison.json'}, {Path(args.out) / 'comparison.png'}")



def add_tokenizer_parsers(sub) -> None:
    """The `train-tokenizer` and `compare-tokenizers` subcommands."""
    """`train-tokenizer` and `compare-tokenizers`."""
    p = sub.add_parser("train-tokenizer", help="train a vae / vq / hybrid image tokenizer")
    p.add_argument("--kind", required=True, choices=["vae", "vq", "hybrid"])
    p.add_argument("--data", default="shapes", help="'digits', 'shapes', or a folder of images")
    p.add_argument("--out", default=None, help="output directory (default: runs/tokenizers/DATA-KIND)")
    for name, kind in (("resolution", integer(2)), ("channels", integer(1, 4)), ("downsample", integer(1)),
                       ("latent-channels", integer(1)), ("codebook-size", integer(0)), ("width", integer(1)),
                       ("res-blocks", integer(0)), ("steps", integer(1)), ("batch-size", integer(1)),
                       ("lr", positive)):
        p.add_argument(f"--{name}", type=kind, default=None, help="default: per data source")
    p.add_argument("--max-minutes", type=positive, default=None, help="wall-clock budget (the lr schedule follows it)")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    p.add_argument("--threads", type=integer(0), default=0, help="torch threads (0 = torch's default)")
    p.set_defaults(fn=cmd_train_tokenizer)

    p = sub.add_parser("compare-tokenizers", help="compare image tokenizers on the same held-out images")
    p.add_argument("tokenizers", nargs="+", metavar="DIR_OR_KIND",
                   help="tokenizer directories (or a diffusers AutoencoderKL directory), or kinds to train here")
    p.add_argument("--data", default="shapes", help="'digits', 'shapes', or a folder of images")
    p.add_argument("--out", default="runs/compare-tokenizers")
    p.add_argument("--held-out", type=integer(1), default=1000, help="held-out images to evaluate on")
    p.add_argument("--steps", type=integer(1), default=None, help="training steps for kinds trained here")
    p.add_argument("--max-minutes", type=positive, default=None, help="training budget per kind trained here")
    p.add_argument("--grid", default=None, help="also save the PNG grid here")
    p.add_argument("--generation", action="store_true",
                   help="also train the tiny backbone on the digits with each tokenizer (DIR[:interface]; "
                        "'pixels' for raw pixels) and report prompted-class accuracy, FWD and captions")
    p.add_argument("--generation-steps", type=integer(1), default=3000, help="backbone training steps per tokenizer")
    p.add_argument("--per-digit", type=integer(1), default=20, help="images drawn per digit for --generation")
    p.add_argument("--threads", type=integer(0), default=0)
    p.set_defaults(fn=cmd_compare_tokenizers)
