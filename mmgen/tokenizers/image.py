"""The image-tokenizer contract, its registry, save/load, and the identity ("pixels") tokenizer.

Every image tokenizer maps images (N, C, R, R) in [-1, 1] to `ImageTokens` on a g×g grid
(g = R / downsample) and back:
    codes:   (N, g, g) int64 in [0, K)              — "vq", "hybrid"
    latents: (N, c, g, g) float, about unit scale    — "pixels", "vae", "diffusers": the latent;
                                                        "hybrid": the residual latent − dequantize(codes)
The model only ever sees `ImageTokens`; `decode(encode(x))` is the reconstruction.
A tokenizer directory holds `config.json` (an `ImageTokenizerConfig`) and `model.safetensors`
(written and read by `mmgen.files`); `reconstruct` runs decode(encode(x)) over a whole image set.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmgen.config import ImageTokenizerConfig
from mmgen.config_check import build
from mmgen.files import load_directory, save_directory


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

    def features(self, images: Tensor) -> Tensor:
        """The continuous latents (N, c, g, g) before any quantization: what the "latents" understanding
        input reads (`mmgen.interfaces.understanding`). Continuous tokenizers: their latents."""
        return self.encode(images).latents

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
        """Write model.safetensors, then config.json (see `mmgen.files.save_directory`)."""
        save_directory(directory, dataclasses.asdict(self.config), self, metadata={"kind": self.config.kind})


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


def config_from_dict(raw: dict[str, Any]) -> ImageTokenizerConfig:
    """An `ImageTokenizerConfig` from a config.json dict, every key and value type checked (see
    `mmgen.config_check`); raises a ConfigError naming the field (and the nearest valid key for a typo)."""
    return build(ImageTokenizerConfig, raw)


def load_image_tokenizer(directory: str | Path, device: str | torch.device = "cpu") -> ImageTokenizer:
    """Load a tokenizer saved by `ImageTokenizer.save_pretrained`, in eval mode; every file is checked first:
    FileNotFoundError for a missing one, ModelFileError naming the bad file (see `mmgen.files.load_directory`)."""
    return load_directory(directory, lambda raw: build_image_tokenizer(config_from_dict(raw)), device,
                          what="mmgen image tokenizer")


@torch.inference_mode()
def reconstruct(tokenizer: ImageTokenizer, images: Tensor, batch_size: int = 256, codes_only: bool = False) -> Tensor:
    """decode(encode(images)) in batches, clamped to [-1, 1], float32 on the CPU (N, C, R, R).
    `codes_only`: drop the continuous part of hybrid tokens (the VQ-only reconstruction)."""
    out = []
    for i in range(0, len(images), batch_size):
        tokens = tokenizer.encode(images[i : i + batch_size].to(tokenizer.device))
        if codes_only:
            tokens = ImageTokens(codes=tokens.codes)
        out.append(tokenizer.decode(tokens).float().clamp(-1, 1).cpu())
    return torch.cat(out)
