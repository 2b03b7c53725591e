"""Sample grids during training: fixed prompts drawn with the EMA weights, saved as one PNG.

The training RNG is left untouched (drawing runs under `torch.random.fork_rng` and seeds its own
generators), so a run with grids and its resumed twin stay bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmgen.files import save_image_grid
from mmgen.model import MMGenModel
from mmgen.tokenizers.text import TextTokenizer
from mmgen.train.optim import EMA


def draw_grid(model: MMGenModel, tokenizer: TextTokenizer, ema: EMA | None, cfg, path: Path) -> None:
    """Draw `cfg.per_prompt` images per prompt of `cfg` (a `SampleConfig`) and save them to `path`,
    one row per prompt; the model's own weights and training mode are restored afterwards."""
    from mmgen.generation import GenerationOptions
    from mmgen.pipeline import Pipeline

    prompts = [p for p in cfg.prompts for _ in range(cfg.per_prompt)]
    with torch.random.fork_rng(devices=[]):
        if ema is not None:
            ema.swap(model)
        try:
            images = Pipeline(model, tokenizer).draw(
                prompts, GenerationOptions(image_steps=cfg.image_steps or None, guidance=cfg.guidance), seed=cfg.seed)
        finally:
            if ema is not None:
                ema.swap(model)
            model.train()
    grid = torch.stack(images).view(len(cfg.prompts), cfg.per_prompt, *images[0].shape)  # (rows, cols, C, H, W)
    save_image_grid(grid, path, scale=cfg.scale)
