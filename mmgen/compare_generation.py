"""`compare-tokenizers --generation`: the same backbone trained with each image interface.

For each tokenizer, the tiny preset is trained on the bundled digits (both directions) with the
interface its tokens call for (codes -> "discrete", codes + residual -> "hybrid", continuous ->
"diffusion", or the one named after a colon, e.g. `pixels:mar`), on the same data, seed and step
budget. Each model then draws `per_digit` images per prompted digit and captions the 297 held-out
digits. Reported: prompted-class accuracy (an SVM on real digits judges each image), FWD between
the drawn and the held-out real digits, caption accuracy, training minutes and drawing speed.
"""

from __future__ import annotations

import time
from pathlib import Path

from mmgen.compare import frechet_wavelet_distance
from mmgen.data.digits import DigitsDataset
from mmgen.evaluation import DigitClassifier, caption_accuracy, generate_digits, prompted_accuracy, save_grid
from mmgen.generation import GenerationOptions
from mmgen.pipeline import Pipeline
from mmgen.tokenizers.image import load_image_tokenizer
from mmgen.train.digits import train_digits
from mmgen.train.loop import TrainOptions

DEFAULT_INTERFACE = {"pixels": "diffusion", "vae": "diffusion", "diffusers": "diffusion", "vq": "discrete",
                     "hybrid": "hybrid"}


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """"DIR[:interface]" or "pixels[:interface]" -> (tokenizer name, its dir or None, interface)."""
    path, _, interface = spec.partition(":")
    if path == "pixels":
        kind, directory = "pixels", None
    else:
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not an image tokenizer directory (train one with `mmgen train-tokenizer`)")
        kind, directory = load_image_tokenizer(path).config.kind, path
    interface = interface or DEFAULT_INTERFACE[kind]
    return Path(path).name, directory, interface


def compare_generation(specs: list[str], out_dir: str | Path, steps: int = 3000, per_digit: int = 20,
                       guidance: float = 3.0, seed: int = 0, progress: bool = True) -> list[dict]:
    """Train and evaluate one digits model per spec; returns one row per spec (and saves grids)."""
    out = Path(out_dir)
    parsed = [parse_spec(s) for s in specs]  # fail on a bad spec before any training
    real = DigitsDataset("test").images
    classifier = DigitClassifier()
    rows = []
    for name, directory, interface in parsed:
        run = out / f"{name}-{interface}"
        start = time.perf_counter()
        model, _, _ = train_digits(run, opts=TrainOptions(steps=steps, seed=seed), show_progress=progress,
                                   interface=interface, image_tokenizer=directory)
        minutes = (time.perf_counter() - start) / 60
        pipe = Pipeline.from_pretrained(run)
        start = time.perf_counter()
        images = generate_digits(pipe, per_digit, GenerationOptions(guidance=guidance), seed=seed)  # (10, n, C, H, W)
        draw_seconds = time.perf_counter() - start
        save_grid(images, run / "samples.png")
        cap_acc, _ = caption_accuracy(pipe, DigitsDataset("test"))
        rows.append({
            "tokenizer": name,
            "interface": interface,
            "tokens/image": model.config.image.tokens_per_image,
            "train steps": steps,
            "train min": round(minutes, 1),
            "prompted acc": round(prompted_accuracy(images, classifier), 3),
            "gen FWD": round(frechet_wavelet_distance(real, images.flatten(0, 1).float()), 3),
            "caption acc": round(cap_acc, 3),
            "draw img/s": round(images.shape[0] * images.shape[1] / draw_seconds, 1),
        })
    return rows
