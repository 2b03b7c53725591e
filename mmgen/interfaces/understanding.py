"""Decoupled image input for understanding (Janus, ILLUME+): read continuous features, write codes.

A causal interface writes an image token by token in its own tokens (VQ codes for discrete and
hybrid). The images it *reads* — prompt images, images that precede their text in training, and an
image once it has been drawn (the engine's clean pass) — may enter the backbone another way,
chosen by `ImageConfig.understanding_input`:
    "codes"    the interface's own `embed` (no module here)
    "latents"  `LatentInput`: the tokenizer's continuous latents before quantization
    "encoder"  `EncoderInput`: a frozen Hugging Face vision model's patch features
Each input is an nn.Module mapping pixels (N, C, R, R) in [-1, 1] and the model's frozen image
tokenizer to slot embeddings (N, L, D): one token per cell of the interface's g×g grid, so the
sequence layout, the attention rule and the KV cache are those of the codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmgen.config import ImageConfig, ModelConfig
from mmgen.errors import ConfigError
from mmgen.tokenizers.image import ImageTokenizer


def projector(features: int, width: int) -> nn.Sequential:
    """The trainable 2-layer MLP (LLaVA-1.5 / Janus) from `features` onto the backbone `width`."""
    return nn.Sequential(nn.Linear(features, width), nn.GELU(), nn.Linear(width, width))


class LatentInput(nn.Module):
    """Continuous latents before quantization (`ImageTokenizer.features`), p×p cells per token, projected."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.patch_size = config.image.patch_size
        self.proj = projector(config.image.patch_dim, config.backbone.hidden_size)

    def forward(self, images: Tensor, tokenizer: ImageTokenizer) -> Tensor:
        """Pixels (N, C, R, R) -> slot embeddings (N, L, D)."""
        with torch.no_grad():
            z = tokenizer.features(images)  # (N, c, G, G)
        p = self.patch_size
        patches = rearrange(z, "n c (h p) (w q) -> n (h w) (c p q)", p=p, q=p)  # (N, L, c·p·p)
        return self.proj(patches.to(self.proj[0].weight.dtype))


class EncoderInput(nn.Module):
    """A frozen vision model loaded from `understanding_encoder` (no download): the images are resized
    to its input size (grey repeated to its channels) and normalized as its image processor says
    (mean = std = 0.5 without one); its patch features (N, s·s, H) are average-pooled to the
    interface's g×g grid and projected by a trainable 2-layer MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        path = config.image.understanding_encoder
        self.encoder = load_vision_model(path)
        vision = self.encoder.config
        self.size, self.channels = vision.image_size, vision.num_channels
        self.side = vision.image_size // vision.patch_size  # patches along each side
        self.grid = config.image.grid
        mean, std = processor_statistics(path, self.channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.proj = projector(vision.hidden_size, config.backbone.hidden_size)

    def train(self, mode: bool = True) -> EncoderInput:
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode (no dropout)
        return self

    @torch.no_grad()
    def patch_features(self, images: Tensor) -> Tensor:
        """Pixels (N, C, R, R) in [-1, 1] -> the encoder's patch features on the token grid (N, L, H)."""
        x = images.to(self.mean.dtype)
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)  # (N, channels, R, R)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std  # (N, channels, size, size), the processor's normalization
        hidden = self.encoder(pixel_values=x).last_hidden_state  # (N, [CLS, registers,] s·s, H)
        grid = rearrange(hidden[:, -self.side**2 :], "n (a b) h -> n h a b", a=self.side)  # (N, H, s, s)
        pooled = F.adaptive_avg_pool2d(grid, self.grid)  # (N, H, g, g)
        return rearrange(pooled, "n h a b -> n (a b) h")  # (N, L, H)

    def forward(self, images: Tensor, tokenizer: ImageTokenizer) -> Tensor:
        """Pixels (N, C, R, R) -> slot embeddings (N, L, D); the tokenizer is not used."""
        return self.proj(self.patch_features(images).to(self.proj[0].weight.dtype))


# A saved model carries its encoder's Hugging Face config in this file (the weights are in model.safetensors).
ENCODER_CONFIG_FILE = "understanding_encoder.json"


def load_vision_model(path: str) -> nn.Module:
    """The frozen vision model of `path`: a Hugging Face model directory (with its pretrained weights), or
    the `ENCODER_CONFIG_FILE` a saved mmgen model carries (the architecture; the weights come with the model)."""
    from transformers import AutoConfig, AutoModel  # here: transformers is only needed for this input

    if not Path(path).exists():
        raise ConfigError(f"image.understanding_encoder = {path!r} does not exist: pass a local Hugging Face vision "
                          "model directory (nothing is downloaded)")
    if Path(path).is_file():
        model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.requires_grad_(False).eval()


def carried_files(understanding: nn.Module | None) -> dict[str, bytes]:
    """The files a model directory carries for its understanding input: the encoder's config, or none."""
    if not isinstance(understanding, EncoderInput):
        return {}
    return {ENCODER_CONFIG_FILE: understanding.encoder.config.to_json_string().encode()}


def use_carried_files(raw: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """A saved model's config.json dict, its `understanding_encoder` pointed at the encoder config the
    directory carries (when it does), so the model loads without the original encoder directory."""
    carried = Path(directory) / ENCODER_CONFIG_FILE
    image = raw.get("image")
    if not carried.is_file() or not isinstance(image, dict) or image.get("understanding_input") != "encoder":
        return raw
    return {**raw, "image": {**image, "understanding_encoder": str(carried)}}


def processor_statistics(path: str, channels: int) -> tuple[list[float], list[float]]:
    """The image processor's per-channel mean and std in `path`, or 0.5 each when it has none."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return [0.5] * channels, [0.5] * channels
    mean, std = processor.image_mean, processor.image_std
    return [float(v) for v in mean], [float(v) for v in std]


# understanding_input -> its module; "codes" (the interface's own `embed`) needs none.
UNDERSTANDING: dict[str, type[nn.Module]] = {"latents": LatentInput, "encoder": EncoderInput}


def check_understanding(interface: str, causal: bool, image: ImageConfig) -> None:
    """Raise a ConfigError, naming the field and the fix, for an understanding input `interface` cannot take."""
    choices = ("codes", *UNDERSTANDING) if causal else ("codes",)
    if image.understanding_input not in choices:
        raise ConfigError(f"image.understanding_input = {image.understanding_input!r}: the {interface!r} interface "
                          f"takes {', '.join(map(repr, choices))}")
    if image.understanding_input == "encoder" and not image.understanding_encoder:
        raise ConfigError("image.understanding_input = 'encoder' needs image.understanding_encoder: pass the local "
                          "directory of a Hugging Face vision model (SigLIP, CLIP vision, DINOv2)")


def build_understanding(config: ModelConfig) -> nn.Module | None:
    """The module of `config.image.understanding_input`, or None for "codes"."""
    cls = UNDERSTANDING.get(config.image.understanding_input)
    return None if cls is None else cls(config)
