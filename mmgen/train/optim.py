"""Optimization pieces shared by the training loops: AdamW groups, fused AdamW and its on-device skip, the
schedule, EMA, and state I/O.

Only trainable parameters are optimized and averaged (the frozen image tokenizer is neither).
Optimizer and EMA state go to safetensors keyed by parameter name, plus JSON for the scalars,
so a checkpoint is read back without unpickling anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to lr · min_lr_ratio at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every trainable parameter, each once (tied weights under their first name)."""
    seen, out = set(), {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def decays_matrices(name: str, p: nn.Parameter) -> bool:
    """The default weight-decay rule: matrices decay; norms, biases and embeddings do not."""
    return p.dim() >= 2 and "embed" not in name


def param_groups(model: nn.Module, weight_decay: float,
                 decays: Callable[[str, nn.Parameter], bool] = decays_matrices) -> list[dict]:
    """Two AdamW groups of the trainable parameters (frozen ones are skipped): those for which
    `decays(name, parameter)` holds get `weight_decay`, the others none."""
    decay, no_decay = [], []
    for name, p in trainable(model).items():
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (CUDA and CPU): one kernel per step, and it honours `found_inf`,
    so `step_unless` skips a non-finite step on the device without a host synchronisation."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def step_unless(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """One step of a fused-AdamW `optimizer` (or accelerate's wrapper of one), a no-op where the 0-dim bool
    `skip` is True: parameters, moments and the step count stay as they were (as GradScaler skips)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del inner.found_inf


class EMA:
    """Exponential moving average of the trainable parameters, with warmup min(decay, (1+n)/(10+n)), n the
    updates made. The count lives on the device, so an update that is skipped on the device (`keep` 0)
    needs no host synchronisation; `updates` reads it (a synchronisation: at checkpoints)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in trainable(model).items()}
        device = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # updates made, exact in float64

    @property
    def updates(self) -> int:
        return int(self.count)

    @updates.setter
    def updates(self, n: int) -> None:
        self.count.fill_(n)

    @torch.no_grad()
    def update(self, model: nn.Module, keep: Tensor | None = None) -> None:
        """Move the averages towards the weights; with `keep` (0-dim, 1: update, 0: leave as is) decided
        on the device."""
        keep = torch.ones((), dtype=torch.float64, device=self.count.device) if keep is None else keep.double()
        self.count += keep
        d = ((1 + self.count) / (10 + self.count)).clamp(max=self.decay)  # as min(decay, (1+n)/(10+n))
        weight = (1 - d) * keep  # float64 -> each dtype once: the weight a Python float 1 - d would give
        weights = {x.dtype: weight.to(x.dtype) for x in self.shadow.values()}
        for n, p in trainable(model).items():
            self.shadow[n].lerp_(p.detach(), weights[p.dtype])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in trainable(model).items():
            p.copy_(self.shadow[n])

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's weights and the averages (twice restores both)."""
        for n, p in trainable(model).items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, Tensor], dict]:
    """(tensors, JSON metadata) of an optimizer, keyed by parameter name (`names`: id(param) -> name)."""
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]  # state_dict numbering
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{order[index]}::{key}"] = value.detach().contiguous()
            else:
                scalars[f"{order[index]}::{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [order[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, Tensor],
                         meta: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`; raises ValueError if the parameters do not match by name and shape."""
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [n for g in meta["param_groups"] for n in g["params"]]
    if saved != order:
        raise ValueError(f"optimizer state is for other parameters: saved {len(saved)}, model {len(order)} "
                         f"(first differences: {[(a, b) for a, b in zip(saved, order) if a != b][:3]})")
    index = {n: i for i, n in enumerate(order)}
    params = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, field = key.split("::")
        if isinstance(value, Tensor) and field.startswith("exp_") and value.shape != params[name].shape:
            raise ValueError(f"optimizer state {key} has shape {tuple(value.shape)}, the parameter {tuple(params[name].shape)}")
        state.setdefault(index[name], {})[field] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [index[n] for n in g["params"]]}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
