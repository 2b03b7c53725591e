"""Compare image tokenizers on the same held-out images: one row (a dict) per tokenizer.

Columns: PSNR, SSIM (Gaussian window, Wang et al. 2004), Fréchet Wavelet Distance (pytorchfwd's
packet transform and Fréchet distance; no downloaded network), codebook usage and perplexity
(discrete kinds), tokens and bits per image, parameters, encode / decode throughput. Bits per image:
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
import torch.nn.functional as F
from torch import Tensor

from mmgen.tokenizers.image import ImageTokenizer, ImageTokens

PSNR_CAP = 100.0  # dB, reported for identical images (MSE 0)
COLUMNS = ("tokenizer", "kind", "tokens_per_image", "bits_per_image", "psnr", "psnr_codes_only", "ssim", "fwd",
           "usage", "perplexity", "params", "encode_img_s", "decode_img_s", "train_steps", "train_minutes")


# -- metrics --------------------------------------------------------------------------------------


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB (N,) of images in [-1, 1] (peak = full range); capped at PSNR_CAP."""
    mse = ((x.double() - y.double()) / 2).pow(2).flatten(1).mean(1)  # on the [0, 1] scale
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP / 10)))).float()


def gaussian_window(size: int, sigma: float) -> Tensor:
    """Normalized 1-D Gaussian (size,), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x.pow(2) / (2 * sigma**2))
    return w / w.sum()


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (N,) of images in [-1, 1], Wang et al. 2004: an 11-tap Gaussian window
    (σ = 1.5), K1 = 0.01, K2 = 0.03, data range 1 (images mapped to [0, 1]), population
    (co)variances, mean over the valid (unpadded) map and over channels. Equals scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)`, whose border crop leaves exactly the valid map. Images smaller than the
    window use the largest odd window that fits (7 for 8×8 digits)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two image batches of the same shape (N, C, H, W), got {x.shape} and {y.shape}")
    n, c, h, w = x.shape
    size = min(window, h - (1 - h % 2), w - (1 - w % 2))
    if size < 3:
        raise ValueError(f"images of {h}×{w} are too small for SSIM (need at least 3×3)")
    g = gaussian_window(size, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()  # (C, 1, k, k) depthwise

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=c)  # (N, C, H−k+1, W−k+1)

    a, b = (x.double() + 1) / 2, (y.double() + 1) / 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def fwd_level(resolution: int) -> int:
    """Wavelet packet level for FWD: pytorchfwd's default 4, fewer for small images (2×2 packets)."""
    return max(1, min(4, int(math.log2(resolution)) - 1))


def frechet_wavelet_distance(real: Tensor, fake: Tensor, level: int | None = None) -> float | None:
    """FWD (Veeramacheneni et al. 2025) between two image sets in [-1, 1], with pytorchfwd's Haar
    packet transform and Fréchet distance (its CLI defaults: Haar, no log scale), averaged over
    packets. Returns None when pytorchfwd is not installed.

    Only `pytorchfwd.freq_math` is imported: `pytorchfwd.fwd` imports torchvision and sets torch's
    global default dtype to float64 at import time.
    """
    try:
        from pytorchfwd.freq_math import calculate_frechet_distance, forward_wavelet_packet_transform
    except ImportError:
        return None
    level = level or fwd_level(real.shape[-1])

    def stats(images: Tensor):
        x = ((images.double().clamp(-1, 1) + 1) / 2).cpu()  # [0, 1], as pytorchfwd's ToTensor gives
        packets = forward_wavelet_packet_transform(x, "Haar", level, False)  # (N, P, C, h, w)
        p = packets.permute(1, 0, 2, 3, 4).flatten(2)  # (P, N, C·h·w)
        return p.mean(1).numpy(), torch.stack([torch.cov(q.T) for q in p]).numpy()

    (mu1, s1), (mu2, s2) = stats(real), stats(fake)
    return float(sum(calculate_frechet_distance(mu1[i], s1[i], mu2[i], s2[i]) for i in range(len(mu1))) / len(mu1))


# -- running a tokenizer --------------------------------------------------------------------------


@torch.inference_mode()
def reconstruct(tokenizer: ImageTokenizer, images: Tensor, batch_size: int = 256, codes_only: bool = False) -> Tensor:
    """decode(encode(images)) clamped to [-1, 1], float32 (N, C, R, R). `codes_only`: drop the
    continuous part of hybrid tokens (the VQ-only reconstruction)."""
    out = []
    for i in range(0, len(images), batch_size):
        tokens = tokenizer.encode(images[i : i + batch_size].to(tokenizer.device))
        if codes_only:
            tokens = ImageTokens(codes=tokens.codes)
        out.append(tokenizer.decode(tokens).float().clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.inference_mode()
def code_statistics_of(tokenizer: ImageTokenizer, images: Tensor, batch_size: int = 256) -> dict[str, float]:
    """Codebook usage (share of the K codes used at least once) and perplexity over all codes of `images`."""
    from mmgen.tokenizers.vq import code_statistics

    codes = torch.cat([tokenizer.encode(images[i : i + batch_size].to(tokenizer.device)).codes.cpu()
                       for i in range(0, len(images), batch_size)])
    usage, perplexity = code_statistics(codes, tokenizer.config.codebook_size)
    return {"usage": round(float(usage), 4), "perplexity": round(float(perplexity), 1)}


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


def save_image_grid(images: Tensor, path: str | Path, scale: int = 4, pad: int = 2,
                    labels: list[str] | None = None) -> None:
    """Save (rows, cols, C, H, W) images in [-1, 1] as one PNG (nearest upscaling by `scale`), with
    optional column labels drawn above."""
    from PIL import Image, ImageDraw

    rows, cols, c, h, w = images.shape
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    x = x.expand(rows, cols, 3, h, w) if c == 1 else x  # grey -> RGB, so labels and colours mix
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)  # (rows, cols, 3, H·s, W·s)
    top = 14 if labels else 0
    hs, ws = h * scale + pad, w * scale + pad
    canvas = torch.full((3, top + rows * hs + pad, cols * ws + pad), 64, dtype=torch.uint8)
    for r in range(rows):
        for k in range(cols):
            y0, x0 = top + pad + r * hs, pad + k * ws
            canvas[:, y0 : y0 + h * scale, x0 : x0 + w * scale] = x[r, k]
    img = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    if labels:
        draw = ImageDraw.Draw(img)
        for k, label in enumerate(labels):
            draw.text((pad + k * ws + 1, 1), label[: max(1, ws // 6)], fill=(255, 255, 255))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# -- the comparison -------------------------------------------------------------------------------


def resolve_tokenizer(spec: str, data: str, out_dir: Path, steps: int | None, max_minutes: float | None,
                      train_images: Tensor | None, eval_images: Tensor) -> tuple[str, ImageTokenizer, dict]:
    """A tokenizer from `spec`: an mmgen tokenizer directory, a diffusers AutoencoderKL directory, or
    a kind ("vae", "vq", "hybrid") trained here with the data source's defaults. Returns (name,
    tokenizer, extra row fields such as training steps and minutes)."""
    from mmgen.config import ImageTokenizerConfig
    from mmgen.tokenizers.image import PixelTokenizer, load_image_tokenizer
    from mmgen.train.tokenizer import load_images, source_defaults, train_image_tokenizer

    d = Path(spec)
    defaults = source_defaults(data)
    channels, resolution = eval_images.shape[1], eval_images.shape[-1]
    if (d / "config.json").is_file():
        raw = json.loads((d / "config.json").read_text())
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
        raise ValueError(f"{spec!r} is neither a tokenizer directory (with config.json) nor a kind to train "
                         "('vae', 'vq', 'hybrid', or 'pixels')")
    shape = {k: defaults[k] for k in ("downsample", "latent_channels", "width", "res_blocks")}
    cfg = ImageTokenizerConfig(kind=spec, channels=channels, resolution=resolution,
                               codebook_size=defaults["codebook_size"] if spec != "vae" else 0, **shape)
    if train_images is None:
        train_images = load_images(data, "train", resolution, channels)
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
    from mmgen.train.tokenizer import load_images

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = Path(specs[0]) / "config.json"
    resolution = json.loads(first.read_text()).get("resolution") if first.is_file() else None
    images = load_images(data, "test", resolution, limit=held_out)
    train_images = None
    rows, columns, labels = [], [images[:grid_images]], ["original"]
    for spec in specs:
        if train_images is None and not (Path(spec) / "config.json").is_file() and spec != "pixels":
            train_images = load_images(data, "train", images.shape[-1], images.shape[1])
        name, tokenizer, extra = resolve_tokenizer(spec, data, out, steps, max_minutes, train_images, images)
        c = tokenizer.config
        if (c.channels, c.resolution) != (images.shape[1], images.shape[-1]):
            raise ValueError(f"tokenizer {name} takes {c.channels}×{c.resolution}² images but {data} gives "
                             f"{images.shape[1]}×{images.shape[-1]}²; pass --resolution or tokenizers trained on {data}")
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
    (out / "comparison.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
    return rows
