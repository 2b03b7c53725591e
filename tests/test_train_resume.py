"""Exact resume after SIGKILL, checkpoints that survive a crash mid-write, resume errors, no new run over an old
one, and a checkpoint exported as a model directory."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import micro_config, restore_threads, run_train, subprocess_env, train_command  # noqa: F401

import mmgen.train.state as state_module
from mmgen.errors import CheckpointError
from mmgen.pipeline import Pipeline
from mmgen.train.checkpoints import CheckpointManager
from mmgen.train.config import TrainConfig
from mmgen.train.entrypoint import main
from mmgen.train.overrides import build
from mmgen.train.trainer import Trainer

STEPS, EVERY = 24, 3


def same_tensors(a: str, b: str) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    cfg = micro_config(tmp_path / "run", tmp_path, train={"steps": STEPS, "threads": 1},
                       checkpoint={"every": EVERY, "keep": 2}, log={"every": EVERY})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full, cut = tmp_path / "full", tmp_path / "cut"
    rng = random.Random()  # a different kill point on every run; printed on failure
    kill_after = rng.choice(range(EVERY, STEPS - 3 * EVERY, EVERY))
    delay = rng.uniform(0.0, 0.05)

    reference = subprocess.Popen(train_command(str(path), f"--out={full}"), env=subprocess_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(train_command(str(path), f"--out={cut}"), env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manager, deadline = CheckpointManager(cut / "checkpoints"), time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        latest = manager.latest()
        if latest is not None and int(latest.name.split("_")[1]) >= kill_after:
            break
        time.sleep(0.005)
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, f"the run ended before the kill: {victim.stderr.read()}"
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    assert not (cut / "model.safetensors").exists()  # it really stopped mid-run
    killed_at = int(manager.latest().name.split("_")[1])
    assert killed_at < STEPS, f"kill after step {kill_after} (+{delay:.3f} s) came too late"

    resumed = run_train(str(path), f"--out={cut}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {cut / 'checkpoints' / f'step_{killed_at:08d}'}" in resumed.stdout
    msg = f"killed after checkpoint {kill_after} (+{delay:.3f} s), resumed from step {killed_at}"
    assert same_tensors(full / "model.safetensors", cut / "model.safetensors"), msg  # exported EMA weights
    last = f"checkpoints/step_{STEPS:08d}"
    for name in ("model.safetensors", "optimizer.safetensors", "ema.safetensors", "rng_0.safetensors"):
        assert same_tensors(full / last / name, cut / last / name), f"{name}: {msg}"
    steps = [json.loads((d / "trainer.json").read_text())["step"] for d in CheckpointManager(cut / "checkpoints").complete()]
    assert steps == [STEPS - EVERY, STEPS]  # keep=2


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tokenizer, monkeypatch):
    tokenizer.save(tmp_path)
    cfg = build(TrainConfig, micro_config(tmp_path / "run", tmp_path, train={"steps": 4}, checkpoint={"every": 2}))
    trainer = Trainer(cfg)
    real, calls = state_module.save_model, []

    def crash_on_second_save(model, filename, metadata=None):
        calls.append(trainer.step)
        real(model, filename, metadata=metadata)
        if len(calls) == 2:  # half-written weights, then the process "dies"
            with open(filename, "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)
            raise KeyboardInterrupt("simulated crash while writing the checkpoint")

    monkeypatch.setattr(state_module, "save_model", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    root = tmp_path / "run" / "checkpoints"
    assert calls == [2, 4]
    assert (root / ".tmp-step_00000004").is_dir()  # the torn write is there, under a temporary name
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert CheckpointManager(root).latest() == root / "step_00000002"

    # the previous checkpoint loads and training goes on from it
    monkeypatch.undo()
    resumed = Trainer(build(TrainConfig, micro_config(tmp_path / "run", tmp_path, train={"steps": 4},
                                                      resume="latest")))
    assert resumed.step == 2
    resumed.fit()
    assert not (root / ".tmp-step_00000004").exists()  # cleaned by the next save
    assert CheckpointManager(root).latest() == root / "step_00000004"


def test_latest_pointer_damaged_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep=5)
    for step in (2, 4):
        (manager.begin(step) / "trainer.json").write_text("{}")
        manager.commit(step)
    (root / "latest").write_text("step_00000099\n")  # points nowhere
    (root / "step_00000006").mkdir()  # a directory without trainer.json is not a checkpoint
    assert manager.latest() == root / "step_00000004"
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        CheckpointManager(tmp_path / "empty").resolve("latest")


def test_resume_from_a_different_model_shape_is_a_clear_error(tmp_path, tokenizer, capsys):
    tokenizer.save(tmp_path)
    cfg = micro_config(tmp_path / "run", tmp_path, train={"steps": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--model.backbone.hidden_size=64", "--resume", str(tmp_path / "run" / "checkpoints")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "was written for a different model" in err and "model.backbone.hidden_size: checkpoint 48, this run 64" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main([str(path), "--resume=" + str(tmp_path / "nowhere")])
    assert "does not exist" in capsys.readouterr().err


def test_a_new_run_never_silently_replaces_a_finished_one(tmp_path, tokenizer, capsys):
    tokenizer.save(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(micro_config(tmp_path / "run", tmp_path, train={"steps": 2})))
    out = main([str(path)])
    weights = (out / "model.safetensors").read_bytes()
    log = (out / "train_log.csv").read_text()
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_:  # another seed into the same OUT: refused, nothing touched
        main([str(path), "--seed=1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint step_00000002)" in err and "--overwrite" in err and "--resume" in err
    assert (out / "model.safetensors").read_bytes() == weights and (out / "train_log.csv").read_text() == log

    (out / "checkpoints" / "step_00000002" / "trainer.json").unlink()  # no checkpoint left: the model still counts
    with pytest.raises(SystemExit):
        main([str(path), "--seed=1"])
    assert "a trained model (model.safetensors)" in capsys.readouterr().err

    assert main([str(path), "--seed=1", "--overwrite"]) == out  # replaces it: new weights, fresh checkpoints
    assert (out / "model.safetensors").read_bytes() != weights
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000002"]
    assert main([str(path), "--resume"]) == out  # a finished run resumed: nothing to train, no error


def test_a_checkpoint_exports_as_a_model_directory(tmp_path, tokenizer):
    """Resuming a checkpoint at its own step into another OUT trains nothing and writes its EMA weights as a model."""
    tokenizer.save(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(micro_config(tmp_path / "run", tmp_path, train={"steps": 4, "ema_decay": 0.9})))
    main([str(path)])
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    out = main([str(ckpt / "train_config.json"), "--resume", str(ckpt), "--train.steps=2", f"--out={tmp_path / 'x'}"])
    ema, exported = load_file(str(ckpt / "ema.safetensors")), load_file(str(out / "model.safetensors"))
    shared = ema.keys() & exported.keys()
    assert len(shared) >= len(ema) - 1 and all(torch.equal(ema[k], exported[k]) for k in shared)  # lm_head may be tied
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert not all(torch.equal(final[k], exported[k]) for k in shared)  # step 2's weights, not the end's
    assert Pipeline.from_pretrained(out).caption([torch.zeros(1, 8, 8)])  # a complete model directory
