"""Resumable checkpoints: atomic directories of safetensors + JSON; the newest K are kept.

    OUT/checkpoints/step_00000500/
        model.safetensors                 raw weights (the whole model, frozen parts included)
        ema.safetensors                   EMA of the trainable weights (when EMA is on)
        optimizer.safetensors / .json     AdamW moments by parameter name / groups and scalars
        rng_{rank}.safetensors            each process's RNG states (torch, loss noise, numpy, python)
        trainer.json                      step, epoch, position in the epoch, counters (written last)
        config.json, train_config.json, tokenizer.model
    OUT/checkpoints/latest                name of the newest complete checkpoint
A checkpoint is written into `.tmp-step_…` and renamed once complete; `latest` is then replaced
atomically. A crash at any point leaves the previous checkpoint and `latest` usable; leftover
temporary directories are never read and are removed by the next save. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model
from torch import Tensor, nn

from mmgen.errors import CheckpointError
from mmgen.files import CONFIG_FILE, WEIGHTS_FILE, atomic_write, fsync_dir

LATEST = "latest"
STATE = "trainer.json"  # written last: its presence marks a complete checkpoint


def step_name(step: int) -> str:
    """The directory name of the checkpoint of `step`: step_00000500."""
    return f"step_{step:08d}"


class CheckpointManager:
    """Checkpoint directories under `root`: begin a temporary one, commit it, find the newest.

    Args:
        root: OUT/checkpoints.
        keep: newest checkpoints kept after each commit.
    """

    def __init__(self, root: str | Path, keep: int = 3):
        self.root, self.keep = Path(root), keep

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step_name(step)}"

    def begin(self, step: int) -> Path:
        """A fresh, empty temporary directory for the checkpoint of `step` (stale ones are removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.tmp_dir(step)
        tmp.mkdir()
        return tmp

    def commit(self, step: int) -> Path:
        """Rename the finished temporary directory into place, point `latest` at it, prune old ones."""
        tmp, final = self.tmp_dir(step), self.root / step_name(step)
        if not (tmp / STATE).is_file():
            raise CheckpointError(f"{tmp} is incomplete ({STATE} missing); not committing it")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = self.root / f".tmp-old-{step_name(step)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write(self.root / LATEST, final.name + "\n")
        self.prune(keep_also=final)
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if p.is_dir() and (p / STATE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def prune(self, keep_also: Path | None = None) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep)]:
            if old != keep_also:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
        pointer = self.root / LATEST
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named.name.startswith("step_") and (named / STATE).is_file():
                return named
        done = self.complete()
        return done[-1] if done else None

    def claim_for_new_run(self, out: Path, overwrite: bool, main: bool) -> None:
        """A run started without --resume may not silently replace another: refuse an OUT that holds a complete
        checkpoint or a trained model, unless `overwrite` (then the main process deletes both)."""
        found, model = self.latest(), out / WEIGHTS_FILE
        if found is None and not model.is_file():
            return
        if not overwrite:
            held = f"checkpoint {found.name}" if found else f"a trained model ({WEIGHTS_FILE})"
            raise CheckpointError(f"{out} already holds a run ({held}) that a new run would overwrite: --resume "
                                  "continues it, --out=OTHER_DIR starts the new run elsewhere, --overwrite=true "
                                  f"replaces it (deletes {self.root} and {model.name})")
        if main:
            shutil.rmtree(self.root, ignore_errors=True)
            model.unlink(missing_ok=True)

    def resolve(self, resume: str) -> Path:
        """`--resume` value -> checkpoint directory: "latest", a checkpoint, a checkpoints dir, or a run dir."""
        if resume == "latest":
            found = self.latest()
            if found is None:
                raise CheckpointError(f"--resume: no complete checkpoint in {self.root} to resume from "
                                      "(start without --resume, or give a checkpoint directory)")
            return found
        p = Path(resume)
        if (p / STATE).is_file():
            return p
        for root in (p, p / "checkpoints"):
            found = CheckpointManager(root).latest() if root.is_dir() else None
            if found is not None:
                return found
        if not p.exists():
            raise CheckpointError(f"--resume: {p} does not exist")
        raise CheckpointError(f"--resume: {p} is not a checkpoint (no {STATE}; a checkpoint is a "
                              "OUT/checkpoints/step_* directory)")


# -- RNG states ------------------------------------------------------------------------------------


def capture_rng(noise: torch.Generator) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every RNG a training step may touch, as uint8/int64 tensors plus string metadata."""
    np_state = np.random.get_state()  # ("MT19937", keys (624,) uint32, pos, has_gauss, cached_gaussian)
    py_state = random.getstate()  # (version, 625 ints, gauss_next)
    tensors = {
        "torch": torch.get_rng_state(),
        "noise": noise.get_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    meta = {"numpy": json.dumps([int(np_state[2]), int(np_state[3]), float(np_state[4])]),
            "python": json.dumps([py_state[0], py_state[2]])}
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, str], noise: torch.Generator) -> None:
    """Inverse of `capture_rng`: set every RNG back to the captured state."""
    torch.set_rng_state(tensors["torch"])
    noise.set_state(tensors["noise"])
    pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss))
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, string metadata) of a safetensors file; raises CheckpointError if it is missing."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def check_same_model(checkpoint: Path, ours: dict) -> None:
    """Raise CheckpointError listing every model-config field where `checkpoint` differs from this run."""
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not an mmgen training checkpoint")
    theirs = json.loads(path.read_text())

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(theirs), flat(json.loads(json.dumps(ours)))  # through JSON: tuples compare as lists
    # fields only one side knows (added to ModelConfig since) are left to the weight-shape check
    diff = [f"model.{k}: checkpoint {a[k]!r}, this run {b[k]!r}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    if diff:
        raise CheckpointError(f"{checkpoint} was written for a different model ({'; '.join(diff[:6])}"
                              f"{' …' if len(diff) > 6 else ''}). Resume with the config it was trained with "
                              f"({checkpoint / 'train_config.json'}), or start a new run with another --out")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load `path` into `model` strictly; raises CheckpointError if it is missing or does not fit."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model: {str(e)[:500]}") from None
