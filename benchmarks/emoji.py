"""Real images: EmojiOne's 2,827 PNG emoji (npm package emojione-assets 4.5.0), captioned by their Unicode names.

    python benchmarks/emoji.py                               # fetch, build, train (configs/image-folder.yaml), measure
    python benchmarks/emoji.py --quick --out /tmp/emoji-quick --docs /tmp/emoji-quick   # toy scale: a pipeline check
    python benchmarks/emoji.py --model runs/emoji/model      # measure an existing model instead of training one
    python benchmarks/emoji.py --tarball emojione-assets-4.5.0.tgz   # no npm here: a tarball fetched by hand
    python benchmarks/emoji.py --size 64 --out runs/emoji64 --optim.lr=3e-4   # other --key=value: to mmgen train

Stages, each skipped when its output under --out (default runs/emoji) exists:
  fetch    `npm pack emojione-assets@4.5.0` (the only download), unpacked with tarfile (absolute paths, `..` and
           links refused); the PNG folder of --size (32 or 64; png/SIZE/_alt, a repeated code point, is left out)
  build    captions from the Unicode names of the file name's code points ("1f600.png" -> "an emoji of a grinning
           face"), pixels by mmgen's conversion rule (`mmgen.data.images.to_grey_or_rgb`: alpha over white, RGB),
           10% held out by the SHA-256 of the code point string -> train/ and heldout/ image folders
  train    `python -m mmgen.train configs/image-folder.yaml` on train/ with --steps, --batch-size, --resolution,
           --preset as overrides -> OUT/model (the run trains its VAE on train/ first, into OUT/model/image_tokenizer;
           an interrupted run resumes from its checkpoint)
  measure  one image per held-out caption; FWD (and its log) against the held-out reals, beside three references
           measured in the same run: as many train reals (the floor), the held-out reals blurred 4× (down and up),
           uniform noise, and for a latent model the held-out reals through its image tokenizer; how often
           generated image i has real i (the one caption i describes) nearest among the held-out reals at 8×8, or
           among the nearest 10; the share of held-out reals the model captions with their main word; writes
           OUT/measure.json and DOCS/emoji_grid.png (real | generated, with the caption), prints a markdown table
docs/emoji.md has the caption rule, the split, the references and measured figures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from emoji_data import TARBALL, build, built, fetch, say
from PIL import Image, ImageDraw, ImageFont

from mmgen.data.images import load_image
from mmgen.generation import GenerationOptions
from mmgen.metrics import frechet_wavelet_distance, fwd_level
from mmgen.pipeline import Pipeline, to_pil
from mmgen.tokenizers.image import reconstruct

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "image-folder.yaml"
QUICK = {"limit": 200, "steps": 30, "batch_size": 8, "resolution": 16, "preset": "tiny"}  # --quick: toy scale
# --quick: the config's 1,000 warmup steps would leave 30 steps at lr ≈ 0; its VAE gets 30 steps too
QUICK_TRAIN = ["--optim.warmup_steps=5", "--image_tokenizer.steps=30"]
SAMPLE_PROMPTS = "[an emoji of a grinning face, an emoji of a red apple, an emoji of a dog face]"
GRID_PAIRS, GRID_SIDE, GRID_COLUMNS = 16, 128, 4  # pairs, pixels per image side, pairs per row
CHUNK = 32  # images per engine call in `measure`
TOKENIZER_FLOOR = "held-out reals through the image tokenizer"  # decode(encode(reals)): a latent model's floor

# -- train --------------------------------------------------------------------------------------------------------


def train(out: Path, args: argparse.Namespace, extra: list[str]) -> Path:
    """`mmgen train configs/image-folder.yaml` on OUT/train -> OUT/model, unless its model.safetensors exists."""
    run = out / "model"
    if (run / "model.safetensors").is_file():
        say(f"train: {run}/model.safetensors exists, skipped")
        return run
    overrides = {"data.sources.0.path": out / "train", "out": run, "train.threads": args.threads,
                 "train.steps": args.steps, "train.batch_size": args.batch_size, "model.preset": args.preset,
                 "model.image.tokenizer.resolution": args.resolution, "samples.prompts": SAMPLE_PROMPTS}
    cmd = [sys.executable, "-m", "mmgen.train", str(CONFIG)]
    cmd += [f"--{k}={v}" for k, v in overrides.items() if v is not None] + extra
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        cmd.append("--resume")
    say("train: mmgen train " + " ".join(cmd[3:]))
    start = time.perf_counter()
    if subprocess.run(cmd, check=False).returncode != 0:
        raise SystemExit("error: mmgen train failed; its message is above (fix it, or pass --model DIR to measure "
                         "an existing model)")
    say(f"train: done in {(time.perf_counter() - start) / 60:.1f} min")
    return run


# -- measure ------------------------------------------------------------------------------------------------------


def records_of(folder: Path) -> list[dict]:
    """The captions.jsonl records of an image folder written by `build`."""
    return [json.loads(line) for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


def images_of(folder: Path, records: list[dict], channels: int, resolution: int) -> torch.Tensor:
    """(N, C, R, R) in [-1, 1]: the records' images, read as training reads them (`load_image`)."""
    return torch.stack([load_image(folder / r["file_name"], channels, resolution) for r in records])


def draw_all(pipe: Pipeline, prompts: list[str], opts: GenerationOptions) -> torch.Tensor:
    """(N, C, R, R): one image per prompt, prompt i with seed i, CHUNK prompts per engine call."""
    images = []
    for start in range(0, len(prompts), CHUNK):
        images += pipe.draw(prompts[start:start + CHUNK], opts, seed=start)
        say(f"measure: drew {len(images)}/{len(prompts)}")
    return torch.stack(images)


def names_main_word(caption: str, word: str) -> bool:
    """Whether `word` occurs in `caption` as a whole word ("face" in "a grinning face", not in "faces")."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", caption.lower()) is not None


def caption_hits(pipe: Pipeline, reals: torch.Tensor, records: list[dict], train_records: list[dict]) -> dict:
    """How often the model's caption of a held-out real names its main word, beside the majority baseline: the
    share whose main word is the commonest main word of the train captions (what always naming it would score)."""
    said = [c for start in range(0, len(reals), CHUNK) for c in pipe.caption(list(reals[start:start + CHUNK]))]
    hits = [names_main_word(c, r["main_word"]) for c, r in zip(said, records, strict=True)]
    common = Counter(r["main_word"] for r in train_records).most_common(1)[0][0]
    return {"caption_hits": sum(hits), "captioned": len(hits), "majority_word": common,
            "majority_hits": sum(r["main_word"] == common for r in records),
            "examples": [{"true": r["text"], "said": c} for r, c in list(zip(records, said, strict=True))[:8]]}


def retrieval(held: torch.Tensor, generated: torch.Tensor, side: int = 8) -> dict:
    """Does image i follow caption i? Rank the held-out reals by L2 distance to generated image i at side×side
    (area-downsampled: colour layout, not detail); a hit is real i, the one caption i describes, among the
    nearest k. FWD compares distributions and cannot see this. Chance: k / N."""
    a = F.interpolate(generated.float(), size=side, mode="area").flatten(1)  # (N, C·side²)
    b = F.interpolate(held.float(), size=side, mode="area").flatten(1)  # (N, C·side²)
    dist = torch.cdist(a, b)  # (N, N): generated i vs real j
    rank = (dist < dist.diagonal()[:, None]).sum(1)  # (N,): reals strictly nearer than the right one
    return {"top1": int((rank < 1).sum()), "top10": int((rank < 10).sum())}


def adherence(result: dict) -> str:
    """`retrieval`'s hits as the tables print them: "nearest % / in the nearest 10 %"."""
    top, n = result["retrieval"], result["images"]
    return f"{100 * top['top1'] / n:.1f}% / {100 * top['top10'] / n:.1f}%"


def blur4(images: torch.Tensor) -> torch.Tensor:
    """Down 4× (area) and back up (bilinear): a reference for a model that draws only the coarse shape."""
    small = F.interpolate(images, scale_factor=0.25, mode="area")
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False).clamp(-1, 1)


def fwd_table(held: torch.Tensor, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    """FWD of each image set against the held-out reals, at `fwd_level` of their resolution."""
    level = fwd_level(held.shape[-1])
    out = {}
    for name, images in sets.items():
        value = frechet_wavelet_distance(held, images, level)
        if value is None:
            raise SystemExit("error: FWD needs the pytorchfwd package: pip install pytorchfwd")
        out[name] = value
    return out


def measure(out: Path, model: Path, args: argparse.Namespace) -> dict:
    """The measure stage: OUT/measure.json (skipped when it exists) and DOCS/emoji_grid.png."""
    path = out / "measure.json"
    if path.is_file():
        result = json.loads(path.read_text())
        if result["model"] != str(model):
            raise SystemExit(f"error: {path} measures {result['model']}, not {model}: delete it to measure {model}")
        if "retrieval" not in result:
            raise SystemExit(f"error: {path} predates the retrieval figure: delete it to measure {model} again")
        say(f"measure: {path} exists, skipped (delete it to measure again)")
        return result
    pipe = Pipeline.from_pretrained(model)
    c = pipe.model.config.image
    records, train_records = records_of(out / "heldout"), records_of(out / "train")
    held = images_of(out / "heldout", records, c.channels, c.resolution)
    train_reals = images_of(out / "train", train_records[: len(records)], c.channels, c.resolution)  # a fixed subset
    opts = GenerationOptions(image_steps=args.image_steps, guidance=args.guidance)
    start = time.perf_counter()
    generated = draw_all(pipe, [r["text"] for r in records], opts)
    draw_s = time.perf_counter() - start
    noise = torch.rand(held.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sets = {"generated": generated, "train reals (floor)": train_reals, "held-out reals, 4× blur": blur4(held),
            "uniform noise": noise}
    if c.tokenizer.kind != "pixels":  # a latent model draws no better than its tokenizer reconstructs
        sets[TOKENIZER_FLOOR] = reconstruct(pipe.model.image_tokenizer, held)
    result = {"model": str(model), "images": len(held), "resolution": c.resolution, "guidance": args.guidance,
              "image_steps": args.image_steps, "fwd_level": fwd_level(c.resolution), "fwd": fwd_table(held, sets),
              "draw_s_per_image": round(draw_s / len(held), 3), "retrieval": retrieval(held, generated),
              **caption_hits(pipe, held, records, train_records)}
    path.write_text(json.dumps(result, indent=1) + "\n")
    grid = Path(args.docs or out) / "emoji_grid.png"
    save_pairs(held[:GRID_PAIRS], generated[:GRID_PAIRS], [r["text"] for r in records[:GRID_PAIRS]], grid)
    say(f"measure: wrote {path} and {grid}")
    return result


def save_pairs(reals: torch.Tensor, fakes: torch.Tensor, captions: list[str], path: Path) -> None:
    """A PNG of (real | generated) pairs, GRID_COLUMNS pairs a row, upscaled to about GRID_SIDE pixels (nearest),
    the caption under each pair."""
    font, scale = ImageFont.load_default(), max(1, GRID_SIDE // reals.shape[-1])
    side, gap, margin, text_h = reals.shape[-1] * scale, 2, 14, 40  # gap inside a pair, margin between pairs
    cell_w, cell_h = 2 * side + gap + margin, side + text_h + margin // 2
    rows = -(-len(reals) // GRID_COLUMNS)
    canvas = Image.new("RGB", (GRID_COLUMNS * cell_w, rows * cell_h), (200, 200, 200))
    draw = ImageDraw.Draw(canvas)
    for i, (real, fake, text) in enumerate(zip(reals, fakes, captions, strict=True)):
        x, y = (i % GRID_COLUMNS) * cell_w, (i // GRID_COLUMNS) * cell_h
        for k, image in enumerate((real, fake)):
            canvas.paste(to_pil(image, scale).convert("RGB"), (x + margin // 2 + k * (side + gap), y + margin // 2))
        lines = textwrap.wrap(text.removeprefix("an emoji of "), width=(2 * side) // 6)[:3]
        draw.multiline_text((x + margin // 2, y + margin // 2 + side + 3), "\n".join(lines), fill=(0, 0, 0), font=font,
                            spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def print_table(result: dict, build_record: dict) -> None:
    """The measure stage's figures as one markdown table."""
    n = result["captioned"]
    print(f"\n{result['model']}: {result['images']} held-out emoji ({build_record['train']} train), "
          f"{result['resolution']}×{result['resolution']}, FWD level {result['fwd_level']}, guidance "
          f"{result['guidance']}, {result['image_steps']} steps, {result['draw_s_per_image']} s/image\n")
    print("| against the held-out reals | FWD ↓ | log FWD ↓ | own real nearest / in the nearest 10 ↑ | "
          "captions naming the main word ↑ |")
    print("|---|---|---|---|---|")
    for name, value in result["fwd"].items():
        mine = name == "generated"
        hits = f"{100 * result['caption_hits'] / n:.1f}% ({result['caption_hits']}/{n})" if mine else "—"
        near = adherence(result) if mine else "—"
        print(f"| {'model: generated / its captions' if mine else name} | {value:.4g} | "
              f"{math.log(value):.2f} | {near} | {hits} |")
    print(f"| chance / always saying {result['majority_word']!r} (the commonest main word) | — | — | "
          f"{100 / n:.1f}% / {1000 / n:.1f}% | {100 * result['majority_hits'] / n:.1f}% ({result['majority_hits']}/{n}) |\n")
    for ex in result["examples"][:4]:
        print(f"true: {ex['true']!r} -> said: {ex['said']!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/emoji"))
    p.add_argument("--docs", help="folder for emoji_grid.png (default: --out)")
    p.add_argument("--tarball", type=Path, help=f"{TARBALL} fetched by hand (default: npm pack into --out)")
    p.add_argument("--size", type=int, default=32, choices=[32, 64], help="which PNGs of the package to use")
    p.add_argument("--model", type=Path, help="measure this model directory instead of training OUT/model")
    p.add_argument("--steps", type=int, help="training steps (default: the config's)")
    p.add_argument("--batch-size", type=int, help="training batch (default: the config's)")
    p.add_argument("--resolution", type=int, help="model resolution (default: --size)")
    p.add_argument("--preset", help="model preset: tiny, small, base (default: the config's)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N emoji in SHA-256 order (0: all)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--image-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch threads here and in training")
    p.add_argument("--quick", action="store_true", help="toy scale: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    args, extra = p.parse_known_args()
    if bad := [a for a in extra if not a.startswith("--") or "=" not in a]:
        p.error(f"unrecognized arguments {bad}: mmgen train overrides are passed as --key=value")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, getattr(args, key) or value)
        extra = QUICK_TRAIN + extra  # a later --key=value wins
    args.resolution = args.resolution or args.size
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    record = built(args.out, args.size, args.limit) or build(args.out, fetch(args), args.size, args.limit)
    model = args.model or train(args.out, args, extra)
    print_table(measure(args.out, model, args), record)


if __name__ == "__main__":
    main()
