"""The image-tokenizer contract, its registry, save/load, and the identity ("pixels") tokenizer.

Every image tokenizer maps images (N, C, R, R) in [-1, 1] to `ImageTokens` on a g×g grid
(g = R / downsample) and back:
    codes:   (N, g, g) int64 in [0, K)              — "vq", "hybrid"
    latents: (N, c, g, g) float, about unit scale    — "pixels", "vae", "diffusers": the latent;
                                                        "hybrid": the residual latent − dequantize(codes)
The model only ever sees `ImageTokens`; `decode(encode(x))` is the reconstruction.
A tokenizer directory holds `config.json` (an `ImageTokenizerConfig`) and `model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from mmgen.config import ImageTokenizerConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


@dataclass
class ImageTokens:
    """Tokens of N images; either field may be None depending on the tokenizer kind."""

    codes: Tensor | None = None  # (N, g, g) int64
    latents: Tensor | None = None  # (N, c, g, g) float

    def __len__(self) -> int:
        return len(self.codes if self.codes is not None else self.latents)

    def to(self, device: torch.device | str) -> ImageTokens:
        return ImageTokens(*(None if v is None else v.to(device) for v in (self.codes, self.latents)))

    def __getitem__(self, rows) -> ImageTokens:
        return ImageTokens(*(None if v is None else v[rows] for v in (self.codes, self.latents)))

    @staticmethod
    def cat(parts: list[ImageTokens]) -> ImageTokens:
        def join(vs):
            return None if vs[0] is None else torch.cat(vs)

        return ImageTokens(join([p.codes for p in parts]), join([p.latents for p in parts]))


class ImageTokenizer(nn.Module):
    """Base class: subclasses implement `encode`, `decode` and, if trainable, `loss`."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        self.config = config

    # -- the contract ----------------------------------------------------------------------------

    def encode(self, images: Tensor) -> ImageTokens:
        raise NotImplementedError

    def decode(self, tokens: ImageTokens) -> Tensor:
        raise NotImplementedError

    def loss(self, images: Tensor, step: int = 0) -> dict[str, Tensor]:
        """Training loss on a batch of images: {"loss": total, ...parts for logging}."""
        raise NotImplementedError(f"the {self.config.kind!r} image tokenizer is not trainable")

    # -- shared helpers --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    def check_images(self, images: Tensor) -> None:
        """Raise a ValueError naming the problem if `images` is not (N, C, R, R) floats in [-1, 1]."""
        c, r = self.config.channels, self.config.resolution
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected an image batch (N, {c}, {r}, {r}), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}; use x / 127.5 - 1")
        if tuple(images.shape[1:]) != (c, r, r):
            raise ValueError(
                f"images of shape {tuple(images.shape[1:])} do not fit this {self.config.kind!r} tokenizer: it takes "
                f"({c}, {r}, {r}) (channels, height, width); resize or convert them first"
            )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors, each via a temporary file and a rename."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (WEIGHTS + ".tmp")
        save_model(self, str(tmp), metadata={"format": "pt", "kind": self.config.kind})
        os.replace(tmp, d / WEIGHTS)
        tmp = d / (CONFIG + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        os.replace(tmp, d / CONFIG)


class PixelTokenizer(ImageTokenizer):
    """The identity: latents are the pixels. Tiny images (8×8 digits) need nothing more."""

    def encode(self, images: Tensor) -> ImageTokens:
        self.check_images(images)
        return ImageTokens(latents=images)

    def decode(self, tokens: ImageTokens) -> Tensor:
        return tokens.latents


# kind -> "module:Class"; imported on first use so optional dependencies (diffusers) stay optional.
IMAGE_TOKENIZERS: dict[str, str] = {
    "pixels": "mmgen.tokenizers.image:PixelTokenizer",
    "vae": "mmgen.tokenizers.vae:VAETokenizer",
    "vq": "mmgen.tokenizers.vq:VQTokenizer",
    "hybrid": "mmgen.tokenizers.hybrid:HybridTokenizer",
    "diffusers": "mmgen.tokenizers.diffusers_vae:DiffusersVAETokenizer",
}


def build_image_tokenizer(config: ImageTokenizerConfig) -> ImageTokenizer:
    """A freshly initialized tokenizer of `config.kind`."""
    module, name = IMAGE_TOKENIZERS[config.kind].split(":")
    return getattr(importlib.import_module(module), name)(config)


def check_weight_shapes(module: nn.Module, weights: Path, config: Path) -> None:
    """Raise a ValueError naming the first tensors whose shapes in `weights` differ from `module`'s."""
    from safetensors import safe_open

    expected = module.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        wrong = [f"{k}: file {tuple(f.get_slice(k).get_shape())} vs config {tuple(expected[k].shape)}"
                 for k in f.keys() if k in expected and tuple(f.get_slice(k).get_shape()) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"{weights} does not match {config} (was config.json edited or copied from another "
                         f"tokenizer?): {'; '.join(wrong[:3])}")


def load_image_tokenizer(directory: str | Path, device: str | torch.device = "cpu") -> ImageTokenizer:
    """Load a tokenizer saved by `ImageTokenizer.save_pretrained`; errors name the missing or bad file."""
    d = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing: not an mmgen image tokenizer directory")
    raw = json.loads((d / CONFIG).read_text())
    names = {f.name for f in dataclasses.fields(ImageTokenizerConfig)}
    if set(raw) - names:
        raise ValueError(f"{d / CONFIG}: unknown keys {sorted(set(raw) - names)}; valid keys: {sorted(names)}")
    tokenizer = build_image_tokenizer(ImageTokenizerConfig(**raw))
    check_weight_shapes(tokenizer, d / WEIGHTS, d / CONFIG)
    missing, unexpected = load_model(tokenizer, str(d / WEIGHTS), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(
            f"{d / WEIGHTS} does not match {d / CONFIG}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return tokenizer.to(device).eval()
