"""`compare-tokenizers --generation`: the same backbone trained with each image interface.

For each tokenizer, the default job (`digits-tiny`: tiny preset, bundled digits, both directions)
runs through the trainer with the interface its tokens call for (codes -> "discrete", codes +
residual -> "hybrid", continuous -> "diffusion", or the one named after a colon, e.g. `pixels:mar`),
and the understanding input named after a plus (how the model reads images, `ImageConfig.understanding_input`;
e.g. `DIR:discrete+latents`, `DIR:hybrid+encoder` with `model.image.understanding_encoder` in the overrides;
default "codes"), on the same data, seed and step budget, every one reading and writing its tokens through
the linear patch layer (the default job's conv patch encoder is the diffusion interface's alone, so it would
favour one column). Each model then draws `per_digit` images per prompted digit
and captions the 297 held-out digits. Reported: prompted-class accuracy (an SVM on real digits
judges each image), FWD between the drawn and the held-out real digits (None, shown empty, when the
optional pytorchfwd is not installed), caption accuracy, training minutes and drawing speed. Run directories:
OUT/NAME-INTERFACE, or OUT/NAME-INTERFACE+INPUT for another understanding input (the model, its log, samples.png).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmgen.data.digits import DigitsDataset
from mmgen.evaluation import DigitClassifier, caption_accuracy, generate_digits, prompted_accuracy
from mmgen.files import CONFIG_FILE, save_image_grid
from mmgen.generation import GenerationOptions
from mmgen.metrics import frechet_wavelet_distance
from mmgen.pipeline import Pipeline
from mmgen.tokenizers.image import load_image_tokenizer
from mmgen.train.config import TrainConfig, load_config
from mmgen.train.trainer import run

CONFIG = "digits-tiny"
DEFAULT_INTERFACE = {"pixels": "diffusion", "vae": "diffusion", "diffusers": "diffusion", "vq": "discrete",
                     "hybrid": "hybrid"}


def parse_spec(spec: str) -> tuple[str, str | None, str, str]:
    """"DIR[:interface[+input]]" or "pixels[:interface[+input]]" -> (tokenizer name, its dir or None, interface,
    understanding input)."""
    path, _, rest = spec.partition(":")
    interface, _, understanding = rest.partition("+")
    if path == "pixels":
        kind, directory = "pixels", None
    else:
        if not (Path(path) / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an image tokenizer directory (train one with "
                                    "`mmgen train-tokenizer`)")
        kind, directory = load_image_tokenizer(path).config.kind, path
    interface = interface or DEFAULT_INTERFACE[kind]
    return Path(path).name, directory, interface, understanding or "codes"


def run_config(out: Path, directory: str | None, interface: str, understanding: str, steps: int, seed: int,
               progress: bool, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The `digits-tiny` job for one tokenizer: its interface, understanding input and image tokenizer,
    `steps` steps, a checkpoint only at the end, no sample grids or evaluation (measured here); then `overrides`.
    The run directories belong to the comparison: running it again retrains them (`overwrite`)."""
    return load_config(CONFIG, {"out": str(out), "seed": seed, "train.steps": steps, "model.image.interface": interface,
                                "model.image.understanding_input": understanding, "model.image.patch_encoder": "linear",
                                "model.image_tokenizer": directory, "checkpoint.every": 0, "samples.every": 0,
                                "eval.digits": 0, "log.progress": progress, "overwrite": True, **(overrides or {})})


def run_name(name: str, interface: str, understanding: str) -> str:
    """A run's directory name: NAME-INTERFACE, plus +INPUT for an understanding input other than codes."""
    return f"{name}-{interface}" + ("" if understanding == "codes" else f"+{understanding}")


def measure(run_dir: Path, per_digit: int, guidance: float, seed: int, classifier: DigitClassifier) -> dict:
    """Draw `per_digit` images per digit with the saved model (also written to RUN/samples.png) and
    caption the held-out digits; the measured columns of a row."""
    pipe = Pipeline.from_pretrained(run_dir)
    start = time.perf_counter()
    images = generate_digits(pipe, per_digit, GenerationOptions(guidance=guidance), seed=seed)  # (10, n, C, H, W)
    draw_seconds = time.perf_counter() - start
    save_image_grid(images, run_dir / "samples.png")
    held_out = DigitsDataset("test")
    cap_acc, _ = caption_accuracy(pipe, held_out)
    fwd = frechet_wavelet_distance(held_out.images, images.flatten(0, 1).float())  # None without pytorchfwd
    return {
        "tokens/image": pipe.model.config.image.tokens_per_image,
        "prompted acc": round(prompted_accuracy(images, classifier), 3),
        "gen FWD": None if fwd is None else round(fwd, 3),
        "caption acc": round(cap_acc, 3),
        "draw img/s": round(images.shape[0] * images.shape[1] / draw_seconds, 1),
    }


def compare_generation(specs: list[str], out_dir: str | Path, steps: int = 3000, per_digit: int = 20,
                       guidance: float = 3.0, seed: int = 0, progress: bool = True,
                       overrides: Mapping[str, Any] | None = None) -> list[dict]:
    """Train and evaluate one digits model per spec; returns one row per spec (and saves grids).

    Args:
        specs: "pixels[:interface[+input]]" or "DIR[:interface[+input]]" (a trained image tokenizer; input:
            the understanding input, "codes" by default).
        out_dir: run directories go here, one per spec (NAME-INTERFACE, NAME-INTERFACE+INPUT).
        steps: training steps of every run.
        per_digit: images drawn per digit.
        overrides: config keys set for every run on top of `digits-tiny` (e.g. a smaller model).
    """
    out = Path(out_dir)
    parsed = [parse_spec(s) for s in specs]
    configs = [run_config(out / run_name(name, interface, understanding), directory, interface, understanding, steps,
                          seed, progress, overrides)
               for name, directory, interface, understanding in parsed]  # a bad spec or key fails before any training
    classifier = DigitClassifier()
    rows = []
    for (name, _, interface, understanding), config in zip(parsed, configs, strict=True):
        start = time.perf_counter()
        run_dir = run(config)
        minutes = (time.perf_counter() - start) / 60
        measured = measure(run_dir, per_digit, guidance, seed, classifier)
        rows.append({"tokenizer": name, "interface": interface, "image input": understanding,
                     "tokens/image": measured.pop("tokens/image"),
                     "train steps": steps, "train min": round(minutes, 1), **measured})
    return rows
