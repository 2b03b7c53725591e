"""A run's state on disk: the resumable checkpoint a `Trainer` writes and reads back, and its export.

    save_checkpoint   every process its RNG states, the main one weights, EMA, optimizer, configs,
                      tokenizer and `trainer.json` (last), committed atomically by `CheckpointManager`
    restore           the inverse, with the checks that keep a resume exact (same global batch, model)
    export            `save_pretrained` into OUT with the EMA weights (under FSDP: the gathered ones)
Every file is written atomically (`mmgen.files`); nothing is pickled. A write that fails (a full
disk) leaves no temporary file or directory and raises `OutputError` naming what is still intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mmgen.errors import CheckpointError, OutputError
from mmgen.files import CONFIG_FILE, WEIGHTS_FILE, save_file, save_model, write_json
from mmgen.outputs import disk_full, output_error
from mmgen.train.checkpoints import STATE, CheckpointManager, capture_rng, read_tensors, restore_rng
from mmgen.train.optim import load_optimizer_state, optimizer_state
from mmgen.train.overrides import to_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmgen.model import MMGenModel
    from mmgen.tokenizers.text_contract import TextTokenizerContract
    from mmgen.train.config import TrainConfig
    from mmgen.train.data import StepBatches
    from mmgen.train.optim import EMA


class Run(Protocol):
    """What this module reads and sets on a run (a `mmgen.train.trainer.Trainer`)."""

    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    main: bool  # the main process
    rank: int
    world: int  # processes
    sharded: bool  # FSDP
    out: Path
    ckpts: CheckpointManager
    state: dict  # trainer.json of the checkpoint being resumed ({} for a new run)
    model: MMGenModel
    wrapped: nn.Module  # the model as accelerate prepared it (DDP / FSDP)
    optimizer: torch.optim.Optimizer
    names: dict[int, str]  # id(parameter) -> name
    ema: EMA | None
    noise: torch.Generator
    tokenizer: TextTokenizerContract
    batches: StepBatches
    step: int
    counters: dict[str, int]


def save_checkpoint(t: Run) -> Path:
    """Write the checkpoint of step `t.step` (every process must call this); returns its directory.

    An OSError while writing (a full disk) removes the temporary directory and raises `OutputError`
    naming the previous checkpoint, which stays intact and resumable."""
    acc, tmp = t.acc, t.ckpts.tmp_dir(t.step)
    try:
        if t.main:
            t.ckpts.begin(t.step)
        acc.wait_for_everyone()
        _write_checkpoint(t, tmp)
        acc.wait_for_everyone()
        final = t.ckpts.commit(t.step) if t.main else t.ckpts.root
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(t, e, f"checkpoint step {t.step} to {t.ckpts.root}") from None
    acc.wait_for_everyone()
    return final


def write_error(t: Run, e: OSError, what: str) -> OutputError:
    """`e`, met while writing `what`, as an OutputError that names the checkpoint still intact (the
    newest complete one) and how to go on from it."""
    if isinstance(e, OutputError):
        return e
    latest, action = t.ckpts.latest(), "free space" if disk_full(e) else "fix that"
    fix = (f"the previous checkpoint {latest} is intact: {action} and resume with --resume" if latest else
           f"no checkpoint of this run is complete yet: {action} and run again, or choose another --out")
    return output_error(e, what, "--out", fix)


def _write_checkpoint(t: Run, tmp: Path) -> None:
    """Every file of the checkpoint into `tmp`; `trainer.json` last (it marks the directory complete)."""
    rng, rng_meta = capture_rng(t.noise)
    save_file(rng, tmp / f"rng_{t.rank}.safetensors", rng_meta)
    save_weights(t, tmp / WEIGHTS_FILE)
    if t.main:
        if t.ema is not None:
            save_file(t.ema.shadow, tmp / "ema.safetensors", {"updates": str(t.ema.updates)})
        if not t.sharded:  # sharded (FSDP) optimizer state is not gathered: such a resume restarts the moments
            tensors, meta = optimizer_state(t.optimizer, t.names)
            save_file(tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "optimizer.json", meta)
        write_json(tmp / CONFIG_FILE, t.model.config.to_dict())
        write_json(tmp / "train_config.json", to_dict(t.cfg))
        t.tokenizer.save(tmp)
        write_json(tmp / STATE, trainer_state(t))  # last: marks the directory complete


def trainer_state(t: Run) -> dict:
    """`trainer.json`: the step, where it is in the data, what the data position depends on, the counters."""
    b, c = t.batches, t.cfg
    state = {"step": t.step, "epoch": b.epoch_of(t.step), "position": t.step % b.steps_per_epoch,
             "steps_per_epoch": b.steps_per_epoch, "global_batch": c.train.batch_size, "world_size": t.world,
             "grad_accum": c.train.grad_accum, "seed": c.seed, **t.counters}
    if t.acc.scaler is not None:
        state["grad_scaler"] = t.acc.scaler.state_dict()
    return state


def restore(t: Run, d: Path) -> None:
    """Load checkpoint `d` into `t` (its weights are already loaded): optimizer, EMA, RNG, step, counters."""
    s, c = t.state, t.cfg
    if s["global_batch"] != c.train.batch_size:
        raise CheckpointError(f"{d} was trained with train.batch_size={s['global_batch']}, this run has "
                              f"{c.train.batch_size}; the data position depends on it: keep it the same")
    if s["world_size"] != t.world and t.main:
        print(f"warning: {d} was written by {s['world_size']} process(es), resuming with {t.world}: the data "
              "order is the same, the diffusion noise is not (not bit-identical to an uninterrupted run)")
    if s["step"] > c.train.steps:
        raise CheckpointError(f"{d} is at step {s['step']}, past train.steps={c.train.steps}")
    if (d / "optimizer.json").is_file() and not t.sharded:
        tensors, _ = read_tensors(d / "optimizer.safetensors")
        meta = json.loads((d / "optimizer.json").read_text())
        try:
            load_optimizer_state(t.optimizer, t.names, tensors, meta)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{d}: cannot restore the optimizer: {e}") from None
    elif t.main:
        print(f"warning: {d} holds no optimizer state (an FSDP run) or this run is sharded: AdamW's moments "
              "restart (not an exact resume)")
    if t.ema is not None:
        _restore_ema(t, d)
    rng_file = d / f"rng_{t.rank}.safetensors"
    if rng_file.is_file():
        restore_rng(*read_tensors(rng_file), t.noise)
    if t.acc.scaler is not None and "grad_scaler" in s:
        t.acc.scaler.load_state_dict(s["grad_scaler"])
    t.step = s["step"]
    t.counters = {k: s.get(k, 0) for k in t.counters}


def _restore_ema(t: Run, d: Path) -> None:
    if not (d / "ema.safetensors").is_file():
        print(f"warning: {d} has no EMA weights; the EMA starts from the current weights")
        return
    shadow, meta = read_tensors(d / "ema.safetensors")
    for n, x in t.ema.shadow.items():
        x.copy_(shadow[n])
    t.ema.updates = int(meta.get("updates", 0))


def export(t: Run) -> None:
    """`save_pretrained` into OUT with the EMA weights (the raw ones stay in the last checkpoint); every
    process must call this. An OSError while writing (a full disk) raises `OutputError`: the last
    checkpoint is intact, and resuming from it (at the last step) exports again."""
    try:
        if t.sharded:  # the gathered weights, written like save_pretrained does (config.json last)
            save_weights(t, t.out / WEIGHTS_FILE)
            if t.main:
                t.tokenizer.save(t.out)
                write_json(t.out / CONFIG_FILE, t.model.config.to_dict())
        elif t.main:
            if t.ema is not None:
                t.ema.copy_to(t.model)
            t.model.save_pretrained(t.out, t.tokenizer)
    except OSError as e:
        raise write_error(t, e, f"the final model to {t.out}") from None
    t.acc.wait_for_everyone()


def save_weights(t: Run, path: Path) -> None:
    """The whole model's weights to `path` (main process). Under FSDP every process must call this:
    the full state dict is gathered collectively."""
    if not t.sharded:
        if t.main:
            save_model(t.model, path, metadata={"format": "pt"})
        return
    state = t.acc.get_state_dict(t.wrapped)  # collective: gathered to the main process
    if t.main:
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if t.model.config.backbone.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; load_model restores it
        save_file(state, path, {"format": "pt"})
