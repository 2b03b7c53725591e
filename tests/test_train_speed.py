"""Training speed options: fused AdamW skipping on the device, steps read back only at log points,
activation checkpointing and compiled layers (same keys, same gradients / steps), the kernel choice."""

from __future__ import annotations

import contextlib

import pytest
import torch
from train_helpers import micro_config, restore_threads  # noqa: F401 (autouse fixture)

from mmgen.errors import ConfigError, TrainingError
from mmgen.train.config import TrainConfig
from mmgen.train.data import make_loader
from mmgen.train.layers import checkpoint_layers, compile_layers
from mmgen.train.optim import EMA, adamw, param_groups, step_unless
from mmgen.train.overrides import build
from mmgen.train.tracking import read_log
from mmgen.train.trainer import Trainer


def trainer_for(tmp_path, tokenizer, **sections) -> Trainer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tmp_path)
    return Trainer(build(TrainConfig, micro_config(tmp_path / "run", tmp_path, **sections)))


def poison(trainer: Trainer, calls: set[int]) -> None:
    """Make the loss NaN on the given (1-based) loss calls."""
    real, n = trainer.model.loss, [0]

    def poisoned(batch, generator=None):
        out = real(batch, generator)
        n[0] += 1
        if n[0] in calls:
            out["lm_sum"] = out["lm_sum"] * float("nan")
        return out

    trainer.model.loss = poisoned


def test_a_skipped_step_changes_nothing_on_the_device(model):
    opt = adamw(param_groups(model, 0.1), 1e-2, (0.9, 0.98), 1e-8)
    ema = EMA(model, 0.99)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    step_unless(opt, torch.tensor(False))
    ema.update(model, torch.tensor(True))
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    weights, shadow = [p.detach().clone() for p in model.parameters()], {n: x.clone() for n, x in ema.shadow.items()}
    step_unless(opt, torch.tensor(True))
    ema.update(model, torch.tensor(False))
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert all(torch.equal(state[id(p)][k], v) for p, s in opt.state.items() for k, v in s.items())  # moments, step
    assert all(torch.equal(shadow[n], x) for n, x in ema.shadow.items()) and ema.updates == 1
    assert not hasattr(opt, "found_inf")
    step_unless(opt, torch.tensor(False))
    assert all(s["step"].item() == 2 for s in opt.state.values())


@contextlib.contextmanager
def no_host_reads(allowed):
    """Raise on tensor -> Python reads (the host synchronisations of a GPU), except inside `allowed` calls."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    real = {n: getattr(torch.Tensor, n) for n in names}
    depth = [0]

    def guard(name):
        def read(self, *args):
            if depth[0] == 0:
                raise AssertionError(f"Tensor.{name} in the training step")
            return real[name](self, *args)
        return read

    def inside(fn):
        def call(*args, **kwargs):
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    for n in names:
        setattr(torch.Tensor, n, guard(n))
    try:
        yield inside(allowed)
    finally:
        for n in names:
            setattr(torch.Tensor, n, real[n])


def test_steps_are_read_back_only_when_accounted_and_exactly(tmp_path, tokenizer, capsys):
    trainer = trainer_for(tmp_path, tokenizer, train={"steps": 8, "max_nonfinite": 3})
    poison(trainer, {2, 4, 5, 6})  # step 2 alone, then steps 4, 5, 6: the limit is reached at step 6
    loader = iter(make_loader(trainer.dataset, trainer.batches, trainer.packer))
    batches, taken = [next(loader) for _ in range(7)], []  # data are prepared on the host anyway
    with no_host_reads(trainer.model.loss) as model_loss:  # the model's forward is not the loop's to change
        trainer.model.loss = model_loss
        for step, batch in enumerate(batches):
            taken.append((*trainer.take_step([batch], step), step))
    assert trainer.counters["skipped_steps"] == 0  # nothing read back yet
    with pytest.raises(TrainingError, match=r"3 steps in a row had a non-finite loss or gradient \(step 6\)"):
        trainer.account(taken)
    assert trainer.counters["skipped_steps"] == 4 and trainer.counters["samples_seen"] == 6 * 8
    err = capsys.readouterr().err
    assert "step 2: non-finite loss (nan)" in err and "update skipped (4 so far)" in err


def test_logs_and_checkpoints_count_every_step(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer, train={"steps": 6}, log={"every": 3}, checkpoint={"every": 2})
    poison(trainer, {2})
    rows = read_log(trainer.fit())
    assert [int(r["step"]) for r in rows] == [3, 6] and [int(r["skipped_steps"]) for r in rows] == [1, 1]
    assert sum(int(r["samples"]) for r in rows) == 6 * 8 == trainer.counters["samples_seen"]
    assert trainer.ema.updates == 5


def test_flex_training_needs_cuda(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="train.attention=flex: FlexAttention has no backward pass on cpu"):
        trainer_for(tmp_path, tokenizer, train={"attention": "flex"})
    with pytest.raises(ConfigError, match="train.attention must be auto, dense or flex"):
        build(TrainConfig, {"train": {"attention": "sdpa"}})


def grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train().loss(batch, torch.Generator().manual_seed(0))["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_keys_and_gradients(model, builder):
    from conftest import digit

    batch = builder([["a digit", digit(0)], [digit(1), "one", digit(2)]])
    keys, reference = list(model.state_dict()), grads(model, batch)
    checkpoint_layers(model.model.layers)
    assert list(model.state_dict()) == keys
    ours = grads(model, batch)
    assert ours.keys() == reference.keys() and len(ours) > 10
    for name, g in reference.items():
        torch.testing.assert_close(ours[name], g, rtol=0, atol=1e-7, msg=name)


@pytest.mark.slow  # compiles one decoder layer forward and backward with inductor: ~20 s on 2 busy cores
def test_compiled_layers_train_like_eager(tmp_path, tokenizer):
    eager = trainer_for(tmp_path / "eager", tokenizer, train={"steps": 1})
    compiled = trainer_for(tmp_path / "compiled", tokenizer, train={"steps": 1, "compile": True})
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # checkpoints, resume, EMA
    rows = {}
    for name, trainer in (("eager", eager), ("compiled", compiled)):
        loader = iter(make_loader(trainer.dataset, trainer.batches, trainer.packer))
        rows[name] = trainer.train_step([next(loader)], 0)
    assert rows["compiled"]["loss"] == pytest.approx(rows["eager"]["loss"], rel=1e-5)
    assert rows["compiled"]["grad_norm"] == pytest.approx(rows["eager"]["grad_norm"], rel=1e-4)
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_layers_keep_their_keys(model):
    keys = list(model.state_dict())
    compile_layers(model.model.layers)  # compiles lazily, at the first call
    assert list(model.state_dict()) == keys and all(layer._compiled_call_impl is not None
                                                    for layer in model.model.layers)
