"""Compare image tokenizers on the same held-out images: one row (a dict) per tokenizer.

Columns (metrics from `mmgen.metrics`): PSNR, SSIM, Fréchet Wavelet Distance, codebook usage and
perplexity (discrete kinds), tokens and bits per image, parameters, encode / decode throughput. Bits per image:
codes cost log2 K bits per token; continuous latents 16 bits (fp16) per element; hybrid pays both.
Rows are plain dicts so other modes (e.g. generation metrics) can add columns; `render_markdown`
renders any list of them. Outputs: markdown on stdout, `comparison.json`, `comparison.png`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from mmgen.config import ImageTokenizerConfig
from mmgen.errors import OptionError
from mmgen.files import CONFIG_FILE, save_image_grid, write_json
from mmgen.metrics import code_statistics_of, frechet_wavelet_distance, fwd_level, psnr, ssim
from mmgen.tokenizers.image import ImageTokenizer, PixelTokenizer, load_image_tokenizer, reconstruct
from mmgen.train.tokenizer import source_defaults, source_images, train_image_tokenizer

COLUMNS = ("tokenizer", "kind", "tokens_per_image", "bits_per_image", "psnr", "psnr_codes_only", "ssim", "fwd",
           "usage", "perplexity", "params", "encode_img_s", "decode_img_s", "train_steps", "train_minutes")


# -- running a tokenizer --------------------------------------------------------------------------


def bits_per_image(tokenizer: ImageTokenizer) -> float:
    """Codes: tokens·log2 K; continuous latents: elements × 16 (fp16); hybrid: both."""
    c = tokenizer.config
    tokens = c.grid**2
    bits = tokens * math.log2(c.codebook_size) if c.discrete else 0.0
    if c.kind != "vq":
        bits += tokens * c.latent_channels * 16
    return bits


@torch.inference_mode()
def throughput(tokenizer: ImageTokenizer, images: Tensor, batch_size: int = 64, repeats: int = 3) -> tuple[float, float]:
    """(encode, decode) images per second on `images`, after one warmup batch each."""
    x = images[:batch_size].to(tokenizer.device)
    tokens = tokenizer.encode(x)  # warmup
    tokenizer.decode(tokens)
    start = time.perf_counter()
    for _ in range(repeats):
        tokens = tokenizer.encode(x)
    enc = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        tokenizer.decode(tokens)
    dec = time.perf_counter() - start
    return repeats * len(x) / enc, repeats * len(x) / dec


def evaluate_tokenizer(name: str, tokenizer: ImageTokenizer, images: Tensor) -> tuple[dict, Tensor]:
    """One comparison row for `tokenizer` on held-out `images`, and its reconstructions."""
    tokenizer.eval()
    recon = reconstruct(tokenizer, images)
    c = tokenizer.config
    row: dict = {"tokenizer": name, "kind": c.kind, "tokens_per_image": c.grid**2,
                 "bits_per_image": round(bits_per_image(tokenizer)),
                 "psnr": round(float(psnr(recon, images).mean()), 2)}
    if c.kind == "hybrid":
        row["psnr_codes_only"] = round(float(psnr(reconstruct(tokenizer, images, codes_only=True), images).mean()), 2)
    row["ssim"] = round(float(ssim(recon, images).mean()), 4)
    fwd = frechet_wavelet_distance(images, recon)
    row["fwd"] = None if fwd is None else float(f"{fwd:.4g}")
    if c.discrete:
        row.update(code_statistics_of(tokenizer, images))
    row["params"] = sum(p.numel() for p in tokenizer.parameters())
    enc, dec = throughput(tokenizer, images)
    row["encode_img_s"], row["decode_img_s"] = round(enc), round(dec)
    return row, recon


# -- output ---------------------------------------------------------------------------------------


def render_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of any row dicts: `columns`, else COLUMNS present in a row, then any other keys."""
    if columns is None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        columns = [k for k in COLUMNS if k in keys] + [k for k in keys if k not in COLUMNS]

    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        if isinstance(v, int) and abs(v) >= 10_000:
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


# -- the comparison -------------------------------------------------------------------------------


def resolve_tokenizer(spec: str, data: str, out_dir: Path, steps: int | None, max_minutes: float | None,
                      train_images: Tensor | None, eval_images: Tensor) -> tuple[str, ImageTokenizer, dict]:
    """A tokenizer from `spec`: an mmgen tokenizer directory, a diffusers AutoencoderKL directory, or
    a kind ("vae", "vq", "hybrid") trained here with the data source's defaults. Returns (name,
    tokenizer, extra row fields such as training steps and minutes)."""
    d = Path(spec)
    defaults = source_defaults(data)
    channels, resolution = eval_images.shape[1], eval_images.shape[-1]
    if (d / CONFIG_FILE).is_file():
        raw = json.loads((d / CONFIG_FILE).read_text())
        extra = {}
        if raw.get("_class_name") == "AutoencoderKL":
            from mmgen.tokenizers.diffusers_vae import DiffusersVAETokenizer

            n_down = 2 ** (len(raw["block_out_channels"]) - 1)
            cfg = ImageTokenizerConfig(kind="diffusers", channels=channels, resolution=resolution, path=str(d),
                                       latent_channels=raw.get("latent_channels", 4), downsample=n_down)
            return d.name, DiffusersVAETokenizer(cfg), extra
        tokenizer = load_image_tokenizer(d)
        if (d / "train_summary.json").is_file():
            s = json.loads((d / "train_summary.json").read_text())
            extra = {"train_steps": s.get("steps"), "train_minutes": s.get("minutes")}
        return d.name, tokenizer, extra
    if spec == "pixels":
        return "pixels", PixelTokenizer(ImageTokenizerConfig(channels=channels, resolution=resolution,
                                                             latent_channels=channels)), {}
    if spec not in ("vae", "vq", "hybrid"):
        raise OptionError(f"{spec!r} is neither a tokenizer directory (with config.json) nor a kind to train "
                         "('vae', 'vq', 'hybrid', or 'pixels')")
    shape = {k: defaults[k] for k in ("downsample", "latent_channels", "width", "res_blocks")}
    cfg = ImageTokenizerConfig(kind=spec, channels=channels, resolution=resolution,
                               codebook_size=defaults["codebook_size"] if spec != "vae" else 0, **shape)
    if train_images is None:
        train_images = source_images(data, "train", resolution, channels)
    tokenizer, _ = train_image_tokenizer(cfg, train_images, out_dir / spec, steps=steps or defaults["steps"],
                                         batch_size=defaults["batch_size"], lr=defaults["lr"],
                                         max_minutes=max_minutes, eval_images=eval_images)
    s = json.loads((out_dir / spec / "train_summary.json").read_text())
    return spec, tokenizer, {"train_steps": s["steps"], "train_minutes": s["minutes"]}


def compare_tokenizers(specs: list[str], data: str, out_dir: str | Path, held_out: int = 1000,
                       steps: int | None = None, max_minutes: float | None = None, grid_images: int = 8,
                       grid_path: str | Path | None = None) -> list[dict]:
    """Evaluate each tokenizer in `specs` (see `resolve_tokenizer`) on the same held-out images of `data`.

    Writes `comparison.json` (rows and settings) and `comparison.png` (originals, then each
    tokenizer's reconstructions, side by side; for hybrid also its codes-only decode) to `out_dir`.
    Args:
        held_out: at most this many held-out images ("test" split of the source).
        steps, max_minutes: training budget of specs given as a kind.
        grid_path: also copy the PNG grid there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = Path(specs[0]) / CONFIG_FILE
    resolution = json.loads(first.read_text()).get("resolution") if first.is_file() else None
    images = source_images(data, "test", resolution, limit=held_out)
    train_images = None
    rows, columns, labels = [], [images[:grid_images]], ["original"]
    for spec in specs:
        if train_images is None and not (Path(spec) / CONFIG_FILE).is_file() and spec != "pixels":
            train_images = source_images(data, "train", images.shape[-1], images.shape[1])
        name, tokenizer, extra = resolve_tokenizer(spec, data, out, steps, max_minutes, train_images, images)
        c = tokenizer.config
        if (c.channels, c.resolution) != (images.shape[1], images.shape[-1]):
            raise OptionError(f"tokenizer {name} takes {c.channels}×{c.resolution}² images but {data} gives "
                              f"{images.shape[1]}×{images.shape[-1]}²; compare tokenizers trained on {data}")
        row, recon = evaluate_tokenizer(name, tokenizer, images)
        rows.append({**row, **extra})
        columns.append(recon[:grid_images])
        labels.append(name)
        if c.kind == "hybrid":
            columns.append(reconstruct(tokenizer, images[:grid_images], codes_only=True))
            labels.append(f"{name} codes")
    grid = torch.stack(columns, 1)  # (images, methods, C, R, R)
    save_image_grid(grid, out / "comparison.png", scale=max(1, 128 // images.shape[-1]), labels=labels)
    if grid_path is not None:
        save_image_grid(grid, grid_path, scale=max(1, 128 // images.shape[-1]), labels=labels)
    meta = {"data": data, "held_out_images": len(images), "resolution": images.shape[-1],
            "fwd": f"pytorchfwd Haar packets, level {fwd_level(images.shape[-1])}, no log scale",
            "bits": "codes: tokens*log2(K); continuous: latent elements*16 (fp16); hybrid: both",
            "throughput": f"images/s, batch 64, {torch.get_num_threads()} CPU threads, after one warmup batch"}
    write_json(out / "comparison.json", {"settings": meta, "rows": rows})
    return rows
