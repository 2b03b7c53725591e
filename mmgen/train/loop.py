"""A minimal single-process training loop: AdamW, warmup + cosine decay, gradient clipping, EMA.

Kept for library use and `mmgen.train.digits`; `mmgen train` (`mmgen.train.trainer`) is the full
accelerate entrypoint with multi-process training, checkpoints and exact resume. Both share the
optimization pieces in `mmgen.train.optim` (frozen parameters are neither optimized nor averaged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBuilder
from mmgen.train.optim import EMA, param_groups, trainable
from mmgen.train.optim import lr_at as schedule

__all__ = ["EMA", "TrainOptions", "lr_at", "param_groups", "train"]


@dataclass
class TrainOptions:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the returned model holds the EMA weights; 0 turns EMA off
    seed: int = 0
    log_every: int = 100


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warmup to opts.lr, then cosine decay to opts.lr · min_lr_ratio at opts.steps."""
    return schedule(step, opts.lr, opts.warmup_steps, opts.steps, opts.min_lr_ratio)


def train(
    model: MMGenModel, builder: SequenceBuilder, samples: Dataset, opts: TrainOptions, show_progress: bool = True
) -> list[dict[str, float]]:
    """Train `model` in place on `samples` (a dataset of interleaved samples); returns the log rows."""
    torch.manual_seed(opts.seed)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=opts.lr, betas=opts.betas)
    sampler = RandomSampler(samples, generator=torch.Generator().manual_seed(opts.seed))
    loader = DataLoader(samples, batch_size=opts.batch_size, sampler=sampler, collate_fn=builder, drop_last=True)
    ema = EMA(model, opts.ema_decay) if opts.ema_decay else None
    noise = torch.Generator(device=model.device).manual_seed(opts.seed + 1)
    log, sums, epoch, step, start = [], {}, 0, 0, time.perf_counter()
    bar = tqdm(total=opts.steps, disable=not show_progress, desc="train", dynamic_ncols=True)
    while step < opts.steps:
        if hasattr(samples, "set_epoch"):
            samples.set_epoch(epoch)
        for batch in loader:
            if step >= opts.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, opts)
            out = model.loss(batch.to(model.device), generator=noise)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model).values(), opts.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            for k in ("loss", "lm", "image"):
                sums[k] = sums.get(k, 0.0) + out[k].item()
            if step % opts.log_every == 0 or step == opts.steps:
                n = step - (log[-1]["step"] if log else 0)
                row = {"step": step, **{k: v / n for k, v in sums.items()},
                       "grad_norm": grad_norm.item(), "lr": lr_at(step - 1, opts),
                       "seconds": time.perf_counter() - start}
                log.append(row)
                sums = {}
                bar.set_postfix(loss=f"{row['loss']:.3f}", lm=f"{row['lm']:.3f}", image=f"{row['image']:.3f}")
            bar.update(1)
        epoch += 1
    bar.close()
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    return log
