"""The bundled default job: train the unified model on scikit-learn's digits, both directions."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mmgen.config import PRESETS, HeadConfig, ImageConfig
from mmgen.data.captions import CaptionSamples, corpus
from mmgen.data.digits import DigitsDataset
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBuilder
from mmgen.tokenizers.image import load_image_tokenizer
from mmgen.tokenizers.text import TextTokenizer
from mmgen.train.loop import TrainOptions, train


def builder_for(model: MMGenModel, tokenizer: TextTokenizer) -> SequenceBuilder:
    cfg = model.config
    return SequenceBuilder(
        tokenizer, cfg.image.channels, cfg.image.resolution, cfg.image.tokens_per_image,
        cfg.backbone.max_position_embeddings,
    )


# A small per-token head suffices for 8×8 digits (HART's is width 1024, depth 6) and halves the step time.
DIGITS_HEAD = HeadConfig(width=128, depth=2, repeat=2)


def digits_image_config(interface: str = "diffusion", image_tokenizer: str | Path | None = None) -> ImageConfig:
    """The image side of a digits model: raw 8×8 pixels in 2×2 patches, or a trained tokenizer's tokens."""
    if image_tokenizer is None:
        if interface not in ("diffusion", "mar"):
            raise ValueError(f"the {interface!r} interface needs a trained image tokenizer (--image-tokenizer DIR)")
        return ImageConfig(interface=interface, patch_size=2, head=DIGITS_HEAD)
    config = load_image_tokenizer(image_tokenizer).config
    if (config.channels, config.resolution) != (1, 8):
        raise ValueError(f"{image_tokenizer} takes {config.channels}×{config.resolution}² images; digits are 1×8²")
    patch = 1 if config.discrete or config.grid < 4 else 2
    return ImageConfig(interface=interface, tokenizer=config, patch_size=patch, head=DIGITS_HEAD)


def train_digits(
    out: str | Path, preset: str = "tiny", objective: str = "flow", opts: TrainOptions | None = None,
    show_progress: bool = True, interface: str = "diffusion", image_tokenizer: str | Path | None = None,
) -> tuple[MMGenModel, TextTokenizer, list[dict]]:
    """Train a text tokenizer and a model on the digits train split; save both to `out`.

    `interface` picks how images meet the backbone; the discrete and hybrid ones take the codes of
    a trained image tokenizer (`image_tokenizer`, a directory from `mmgen train-tokenizer`).
    """
    opts = opts or TrainOptions()
    torch.manual_seed(opts.seed)
    pairs = DigitsDataset("train")
    tokenizer = TextTokenizer.train(corpus(pairs), vocab_size=512)
    cfg = PRESETS[preset](digits_image_config(interface, image_tokenizer))
    cfg.backbone.vocab_size = len(tokenizer)
    cfg.diffusion.objective = objective
    model = MMGenModel(cfg, load_image_tokenizer(image_tokenizer) if image_tokenizer else None)
    start = time.perf_counter()
    log = train(model, builder_for(model, tokenizer), CaptionSamples(pairs, seed=opts.seed), opts, show_progress)
    log[-1]["train_seconds"] = time.perf_counter() - start
    model.save_pretrained(out, tokenizer)
    return model, tokenizer, log
