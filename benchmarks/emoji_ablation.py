"""The emoji recipe ablation: one `benchmarks/emoji.py` run per variant, same data, steps, batch and seed.

    python benchmarks/emoji_ablation.py --tarball runs/emoji/emojione-assets-4.5.0.tgz   # the CPU budget below
    python benchmarks/emoji_ablation.py --steps 20000 --batch-size 64 --preset small --patch-size 2 --threads 16
    python benchmarks/emoji_ablation.py --only baseline,unet                              # some variants
    mmgen train-tokenizer --kind vae --data runs/emoji-ablation/baseline/train --resolution 32 --channels 3 \
        --downsample 4 --out runs/tokenizers/emoji-vae --max-minutes 10   # the VAE of the 2d+vae variants (--vae)

Each variant is configs/image-folder.yaml at the budget below plus `mmgen train` overrides (VARIANTS): the
raw-pixel ones pin pixels in patches of --patch-size, "default" keeps the config's recipe (a VAE trained first in
the run, --vae-steps steps); its run lives in OUT/<variant> and a rerun skips what is done (emoji.py's stages). The
table gives, per variant: parameters (the frozen VAE's included), training wall time per step, FWD and log FWD of
one generated image per held-out caption against the held-out reals, the share of the baseline's log-FWD gap to the
real-vs-real floor that the variant closes, the log FWD of the held-out reals through its image tokenizer (what a
latent model can reach at best), how often generated image i has real i (the one its caption describes) nearest
among the held-out reals at 8×8 or in the nearest 10 (FWD cannot see whether images follow their captions), and how
often its caption of a held-out real names the main word. The gap is measured from OUT/baseline/measure.json when
the baseline is not among the variants run.
The floor and the references are measured in each run (they must agree).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

from emoji import TOKENIZER_FLOOR, adherence
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
FLOOR = "train reals (floor)"
# Raw pixels in patches of --patch-size (configs/image-folder.yaml trains a VAE and diffuses its latents).
PIXELS = ["--model.image.tokenizer.kind=pixels", "--model.image.tokenizer.latent_channels=3",
          "--model.image.tokenizer.downsample=1", "--model.image.patch_size={patch}"]
TWO_D = "--model.backbone.image_positions=2d"
UNET = ["--model.image.patch_encoder=unet", "--model.image.unet_channels=16"]
VAE = ["--model.image_tokenizer={vae}", "--model.image.patch_size=1"]  # trained before (--vae): one token per cell
VARIANTS: dict[str, list[str]] = {
    # linear patch layers, 1-D RoPE over the whole sequence, uniform t: the first recipe
    "baseline": [*PIXELS, "--model.backbone.image_positions=1d"],
    "unet": [*PIXELS, "--model.backbone.image_positions=1d", *UNET],
    "unet_no_skips": [*PIXELS, "--model.backbone.image_positions=1d", *UNET, "--model.image.unet_skips=false"],
    "2d": [*PIXELS, TWO_D],
    "logit_normal": [*PIXELS, "--model.backbone.image_positions=1d", "--model.diffusion.t_sampling=logit_normal"],
    "2d+logit_normal": [*PIXELS, TWO_D, "--model.diffusion.t_sampling=logit_normal"],
    "2d+lr2x": [*PIXELS, TWO_D, "--optim.lr=2e-3"],  # after --lr: the last value wins
    "2d+lr4x": [*PIXELS, TWO_D, "--optim.lr=4e-3"],
    "2d+no_ema": [*PIXELS, TWO_D, "--train.ema_decay=0"],  # the raw weights
    "2d+lr2x+no_ema": [*PIXELS, TWO_D, "--optim.lr=2e-3", "--train.ema_decay=0"],
    # the model's shape at about the tiny preset's parameters (4 layers × width 192: 1.77M in the layers)
    "2d+deep": [*PIXELS, TWO_D, "--model.backbone.num_hidden_layers=8", "--model.backbone.hidden_size=136",
                "--model.backbone.intermediate_size=368"],  # 1.79M
    "2d+shallow": [*PIXELS, TWO_D, "--model.backbone.num_hidden_layers=2", "--model.backbone.hidden_size=272",
                   "--model.backbone.intermediate_size=728"],  # 1.78M
    "2d+patch8": [*PIXELS, TWO_D, "--model.image.patch_size=8"],  # 16 tokens per image
    "unet+2d+logit_normal": [*PIXELS, *UNET, TWO_D, "--model.diffusion.t_sampling=logit_normal"],
    # latents of mmgen's own VAE trained on the train split (--vae; 4× down: 8×8 latents, one token each)
    "2d+vae": [TWO_D, *VAE],
    "2d+vae+no_ema": [TWO_D, *VAE, "--train.ema_decay=0"],
    "2d+vae+lr2x": [TWO_D, *VAE, "--optim.lr=2e-3"],
    "2d+vae+logit_normal": [TWO_D, *VAE, "--model.diffusion.t_sampling=logit_normal"],
    "2d+vae+logit_normal+no_ema": [TWO_D, *VAE, "--model.diffusion.t_sampling=logit_normal", "--train.ema_decay=0"],
    # configs/image-folder.yaml as it is: 2-D RoPE over the latents of a VAE the run trains first (--vae-steps)
    "default": ["--image_tokenizer.steps={vae_steps}"],
}


def run_variant(name: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """emoji.py for one variant -> its measure.json, plus parameters and seconds per training step."""
    out = args.out / name
    cmd = [sys.executable, str(HERE / "emoji.py"), f"--out={out}", f"--steps={args.steps}",
           f"--batch-size={args.batch_size}", f"--preset={args.preset}", f"--threads={args.threads}",
           f"--optim.warmup_steps={args.warmup}", f"--optim.lr={args.lr}", "--log.progress=false",
           "--samples.every=0",
           *(a.format(patch=args.patch_size, vae=args.vae, vae_steps=args.vae_steps) for a in VARIANTS[name]), *extra]
    if args.tarball:
        cmd.append(f"--tarball={args.tarball}")
    print(f"\n== {name}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    result = json.loads((out / "measure.json").read_text())
    log = list(csv.DictReader((out / "model" / "train_log.csv").open()))  # "seconds": since the previous row
    seconds_per_step = sum(float(r["seconds"]) for r in log) / int(log[-1]["step"])
    with safe_open(out / "model" / "model.safetensors", "pt") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    return {**result, "name": name, "seconds_per_step": seconds_per_step, "parameters": parameters}


def print_table(rows: list[dict], base: dict) -> None:
    """One markdown row per variant; the gap is measured from `base` (the baseline variant's run)."""
    floor = math.log(base["fwd"][FLOOR])
    gap = math.log(base["fwd"]["generated"]) - floor
    print(f"\nfloor (train reals vs held-out reals): log FWD {floor:.2f}; baseline gap {gap:.2f}; captions: always "
          f"naming the commonest main word ({base['majority_word']!r}) would score "
          f"{100 * base['majority_hits'] / base['captioned']:.1f}%\n")
    n = base["images"]
    print(f"own real nearest / in the nearest 10: generated image i vs the {n} held-out reals at 8×8 (chance "
          f"{100 / n:.1f}% / {1000 / n:.1f}%); tokenizer floor: log FWD of the held-out reals through the "
          f"variant's image tokenizer (— for pixels)\n")
    print("| variant | parameters | s / step | FWD ↓ | log FWD ↓ | baseline gap closed ↑ | tokenizer floor | own real "
          "nearest / in the nearest 10 ↑ | captions naming the main word ↑ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log_fwd = math.log(r["fwd"]["generated"])
        closed = (math.log(base["fwd"]["generated"]) - log_fwd) / gap if gap > 0 else float("nan")
        tokenizer = f"{math.log(r['fwd'][TOKENIZER_FLOOR]):.2f}" if TOKENIZER_FLOOR in r["fwd"] else "—"
        print(f"| {r['name']} | {r['parameters'] / 1e6:.2f} M | {r['seconds_per_step']:.2f} | "
              f"{r['fwd']['generated']:.4g} | {log_fwd:.2f} | {100 * closed:.0f}% | {tokenizer} | {adherence(r)} | "
              f"{100 * r['caption_hits'] / r['captioned']:.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/emoji-ablation"))
    p.add_argument("--tarball", type=Path, help="emojione-assets-4.5.0.tgz already fetched (default: npm pack)")
    p.add_argument("--only", help=f"comma-separated variants (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--patch-size", type=int, default=4, help="pixels per patch side of the raw-pixel variants")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae", type=Path, default=Path("runs/tokenizers/emoji-vae"), help="the VAE of the 2d+vae variants")
    p.add_argument("--vae-steps", type=int, default=1000, help="steps of the VAE the default variant trains first")
    args, extra = p.parse_known_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    if unknown := [n for n in names if n not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    needs_vae = [n for n in names if any("{vae}" in a for a in VARIANTS[n])]
    if needs_vae and not (args.vae / "config.json").is_file():
        p.error(f"{needs_vae[0]} needs a VAE at --vae {args.vae}; train one on the train split first: "
                f"mmgen train-tokenizer --kind vae --data {args.out}/baseline/train --resolution 32 --channels 3 "
                f"--downsample 4 --out {args.vae}")
    rows = [run_variant(name, args, extra) for name in names]
    base_file = args.out / "baseline" / "measure.json"  # the gap's reference, from this or an earlier invocation
    base = next((r for r in rows if r["name"] == "baseline"), None)
    if base is None and base_file.is_file():
        base = json.loads(base_file.read_text())
    if base is None:
        print(f"(no baseline run at {base_file}: gaps are measured from {rows[0]['name']})")
    print_table(rows, base or rows[0])


if __name__ == "__main__":
    main()
