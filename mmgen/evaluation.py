"""Measurements that need no downloaded network: a digits classifier for prompted-class accuracy,
caption accuracy on held-out real digits, and a PNG grid of the generated digits to look at."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmgen.data.digits import WORDS, DigitsDataset, parse_digit
from mmgen.data.images import fit_tensor
from mmgen.files import save_image_grid
from mmgen.generation import GenerationOptions
from mmgen.pipeline import Pipeline

PROMPT = "a handwritten digit {d}"


class DigitClassifier:
    """An RBF SVM on the real training digits (all 297 held-out digits right).

    Images of any size and channel count are brought back to 8×8 grey (`fit_tensor`: antialiased
    bilinear). For a model at another format (`channels`, `resolution`), the SVM trains on real digits
    taken to that format and back, so real and generated images are judged through the same round trip.
    """

    def __init__(self, channels: int = 1, resolution: int = 8) -> None:
        from sklearn.svm import SVC

        train = DigitsDataset("train")
        images = train.images
        if (channels, resolution) != (1, 8):
            images = torch.stack([fit_tensor(x, channels, resolution) for x in images])
        self.svm = SVC(gamma="scale", C=10.0).fit(self._features(images), train.labels.numpy())

    @staticmethod
    def _features(images: Tensor) -> np.ndarray:
        if images.shape[1:] != (1, 8, 8):
            images = torch.stack([fit_tensor(x.float(), 1, 8) for x in images])
        return ((images.float().clamp(-1, 1) + 1) * 8).reshape(len(images), -1).numpy()  # back to 0..16

    def predict(self, images: Tensor) -> np.ndarray:
        """(N, C, H, W) in [-1, 1] -> (N,) digit labels."""
        return self.svm.predict(self._features(images.cpu()))


def generate_digits(pipe: Pipeline, per_digit: int, options: GenerationOptions, seed: int = 0,
                    template: str = PROMPT) -> Tensor:
    """`per_digit` images for each digit from its prompt -> (10, per_digit, C, H, W)."""
    prompts = [template.format(d=d, w=WORDS[d]) for d in range(10) for _ in range(per_digit)]
    images = torch.stack(pipe.draw(prompts, options, seed=seed))
    return images.view(10, per_digit, *images.shape[1:])


def prompted_accuracy(images: Tensor, classifier: DigitClassifier) -> float:
    """Share of generated digits (10, n, ...) whose class is the prompted one."""
    pred = classifier.predict(images.flatten(0, 1)).reshape(10, -1)
    return float((pred == np.arange(10)[:, None]).mean())


def caption_accuracy(pipe: Pipeline, dataset: DigitsDataset, batch_size: int = 128) -> tuple[float, list[str]]:
    """Greedy captions of real digits; the share naming the right digit, and the captions."""
    captions = []
    for start in range(0, len(dataset), batch_size):
        captions += pipe.caption([dataset.images[i] for i in range(start, min(start + batch_size, len(dataset)))])
    hits = [parse_digit(c) == int(y) for c, y in zip(captions, dataset.labels)]
    return float(np.mean(hits)), captions


def evaluate_digits(model_dir: str | Path, per_digit: int = 10, options: GenerationOptions | None = None,
                    grid: str | Path | None = None, seed: int = 0) -> dict:
    """Prompted-class accuracy of generated digits and caption accuracy on the 297 held-out digits."""
    pipe = Pipeline.from_pretrained(model_dir)
    options = options or GenerationOptions()
    start = time.perf_counter()
    images = generate_digits(pipe, per_digit, options, seed)
    gen_seconds = time.perf_counter() - start
    c = pipe.model.config.image
    acc = prompted_accuracy(images, DigitClassifier(c.channels, c.resolution))
    if grid is not None:
        save_image_grid(images, grid)
    start = time.perf_counter()
    cap_acc, captions = caption_accuracy(pipe, DigitsDataset("test"))
    return {
        "prompted_class_accuracy": acc,
        "images": images.shape[0] * images.shape[1],
        "sampler": options.sampler,
        "image_steps": options.image_steps,
        "guidance": options.guidance.scale,
        "generation_seconds": round(gen_seconds, 2),
        "caption_accuracy": cap_acc,
        "held_out_digits": len(captions),
        "caption_seconds": round(time.perf_counter() - start, 2),
        "example_captions": captions[:4],
    }
