"""Measurements that need no downloaded network: a digits classifier for prompted-class accuracy,
caption accuracy on held-out real digits, and PNG grids to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmgen.data.digits import WORDS, DigitsDataset, parse_digit
from mmgen.generation import Engine, GenerationOptions


class DigitClassifier:
    """An RBF SVM on the real training digits (≈99% on the held-out split)."""

    def __init__(self) -> None:
        from sklearn.svm import SVC

        train = DigitsDataset("train")
        self.svm = SVC(gamma="scale", C=10.0).fit(self._features(train.images), train.labels.numpy())

    @staticmethod
    def _features(images: Tensor) -> np.ndarray:
        return ((images.float().clamp(-1, 1) + 1) * 8).reshape(len(images), -1).numpy()  # back to 0..16

    def predict(self, images: Tensor) -> np.ndarray:
        """(N, 1, 8, 8) in [-1, 1] -> (N,) digit labels."""
        return self.svm.predict(self._features(images.cpu()))


def generate_digits(
    engine: Engine, tokenizer, per_digit: int, options: GenerationOptions, seed: int = 0,
    template: str = "a handwritten digit {d}",
) -> Tensor:
    """`per_digit` images for each digit from its prompt -> (10, per_digit, C, H, W)."""
    prompts = [[tokenizer.encode(template.format(d=d, w=WORDS[d]))] for d in range(10) for _ in range(per_digit)]
    opts = GenerationOptions(**{**options.__dict__, "max_new_tokens": 1})
    out = engine.generate(prompts, opts, seed=seed, force_image=True)
    images = torch.stack([row[0] for row in out])
    return images.view(10, per_digit, *images.shape[1:])


def prompted_accuracy(images: Tensor, classifier: DigitClassifier) -> float:
    """Share of generated digits (10, n, ...) whose class is the prompted one."""
    pred = classifier.predict(images.flatten(0, 1)).reshape(10, -1)
    return float((pred == np.arange(10)[:, None]).mean())


def caption_accuracy(engine: Engine, tokenizer, dataset: DigitsDataset, batch_size: int = 128) -> tuple[float, list[str]]:
    """Greedy captions of real digits; the share naming the right digit, and the captions."""
    opts = GenerationOptions(max_new_tokens=16, temperature=0)
    captions = []
    for start in range(0, len(dataset), batch_size):
        prompts = [[dataset.images[i]] for i in range(start, min(start + batch_size, len(dataset)))]
        for row in engine.generate(prompts, opts):
            captions.append(" ".join(tokenizer.decode(s) for s in row if isinstance(s, list)))
    hits = [parse_digit(c) == int(y) for c, y in zip(captions, dataset.labels)]
    return float(np.mean(hits)), captions


def save_grid(images: Tensor, path: str | Path, scale: int = 4, pad: int = 1) -> None:
    """Save (rows, cols, C, H, W) images in [-1, 1] as one PNG, each image upscaled `scale`× (nearest)."""
    rows, cols, c, h, w = images.shape
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    hs, ws = h * scale + pad, w * scale + pad
    canvas = torch.full((c, rows * hs + pad, cols * ws + pad), 64, dtype=torch.uint8)
    for r in range(rows):
        for k in range(cols):
            canvas[:, pad + r * hs : pad + r * hs + h * scale, pad + k * ws : pad + k * ws + w * scale] = x[r, k]
    arr = canvas.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
