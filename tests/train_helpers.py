"""Shared pieces of the training tests: a micro training config and deterministic image noise."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgen.interfaces.diffusion import DiffusionInterface

REPO = Path(__file__).resolve().parents[1]

MICRO_MODEL = {
    "preset": "tiny",
    "backbone": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 96},
    "diffusion": {"objective": "flow"},
}


def micro_config(out, tokenizer_dir, **sections) -> dict:
    """A raw training config (dict) for a ~0.1M-parameter model on 200 digits; `sections` replace keys."""
    cfg = {
        "out": str(out),
        "model": copy.deepcopy(MICRO_MODEL),
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"sources": [{"kind": "digits", "limit": 200}]},
        "train": {"steps": 4, "batch_size": 8, "threads": 1},  # 1 thread: fast on a busy 2-core machine
        "optim": {"warmup_steps": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"every": 2, "progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture(autouse=True)
def restore_threads():
    """Trainers set the torch thread count of the process; give the next test its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def fixed_train_inputs(self, tokens, conditions, generator):
    """DiffusionInterface.train_inputs with noise time and noise a function of the image alone, so the
    loss of a sample does not depend on which process or micro-batch drew it."""
    x0 = tokens.latents.to(self.dtype)
    t = x0.flatten(1).sum(1).sin() * 0.45 + 0.5  # (N,) in (0.05, 0.95)
    t = torch.where(conditions, t * self.diffusion.max_t_when_conditioning, t)
    noise = torch.sin(x0 * 12.9898 + 78.233)
    x_t, target = self.objective.add_noise(x0, t, noise)
    inputs, state = self.embed_patches(x_t, t)
    return inputs, (self.patchify(target), state)


def patch_noise(monkeypatch) -> None:
    monkeypatch.setattr(DiffusionInterface, "train_inputs", fixed_train_inputs)


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmgen.train", *args]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def run_train(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(*args), env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
