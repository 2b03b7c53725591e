"""The bundled default job: train the unified model on scikit-learn's digits, both directions."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mmgen.config import PRESETS
from mmgen.data.captions import CaptionSamples, corpus
from mmgen.data.digits import DigitsDataset
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBuilder
from mmgen.tokenizers.text import TextTokenizer
from mmgen.train.loop import TrainOptions, train


def builder_for(model: MMGenModel, tokenizer: TextTokenizer) -> SequenceBuilder:
    cfg = model.config
    return SequenceBuilder(
        tokenizer, cfg.image.channels, cfg.image.resolution, cfg.image.tokens_per_image,
        cfg.backbone.max_position_embeddings,
    )


def train_digits(
    out: str | Path, preset: str = "tiny", objective: str = "flow", opts: TrainOptions | None = None,
    show_progress: bool = True,
) -> tuple[MMGenModel, TextTokenizer, list[dict]]:
    """Train a text tokenizer and a model on the digits train split; save both to `out`."""
    opts = opts or TrainOptions()
    torch.manual_seed(opts.seed)
    pairs = DigitsDataset("train")
    tokenizer = TextTokenizer.train(corpus(pairs), vocab_size=512)
    cfg = PRESETS[preset]()
    cfg.backbone.vocab_size = len(tokenizer)
    cfg.diffusion.objective = objective
    model = MMGenModel(cfg)
    start = time.perf_counter()
    log = train(model, builder_for(model, tokenizer), CaptionSamples(pairs, seed=opts.seed), opts, show_progress)
    log[-1]["train_seconds"] = time.perf_counter() - start
    model.save_pretrained(out, tokenizer)
    return model, tokenizer, log
