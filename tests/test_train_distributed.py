"""Two real processes over gloo compute the loss and gradients of one process with the whole batch.

The workers are forked by accelerate's launcher machinery (as `debug_launcher`, on a free port) and
each builds a full `Trainer`: its sharding, its accumulation with `no_sync`, its DDP-wrapped loss and
its global normalization. Image noise is made a function of the image (see `fixed_train_inputs`) so
that the loss of a sample does not depend on which process drew it.
"""

from __future__ import annotations

import socket
import tempfile

import pytest
import torch
from accelerate.utils import PrepareForLaunch, patch_environment
from safetensors.torch import load_file, save_file
from torch.multiprocessing import start_processes
from train_helpers import micro_config, patch_noise, restore_threads  # noqa: F401 (autouse fixture)

from mmgen.train.config import TrainConfig
from mmgen.train.data import make_loader
from mmgen.train.overrides import build
from mmgen.train.trainer import Trainer

# digits and plain text mixed, so the two processes hold different numbers of tokens and images
MIXED = {"sources": [{"kind": "digits", "limit": 64}, {"kind": "text", "path": "PLACEHOLDER", "weight": 0.7}],
         "packing": "pack"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grads_of(cfg: dict, out_file: str) -> None:
    """Build a Trainer, run forward/backward on its share of step 0, save its grads and figures."""
    torch.set_num_threads(1)
    trainer = Trainer(build(TrainConfig, cfg))
    loader = iter(make_loader(trainer.dataset, trainer.batches, trainer.packer))
    micro = [next(loader) for _ in range(cfg["train"]["grad_accum"])]
    sums, tokens, images = trainer.forward_backward(micro)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    local = [sum(m.stats[k] for m in micro) for k in ("labelled", "images")]
    figures = torch.tensor([sums[0] / tokens + sums[3] / images, tokens, images, *local], dtype=torch.float64)
    save_file({**grads, "__figures__": figures}, out_file.format(rank=trainer.rank))


def _worker(cfg: dict, out_file: str) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fork inherits the parent's single-process state
    grads_of(cfg, out_file)


def test_two_processes_match_one_process_with_the_global_batch(tmp_path, tokenizer, monkeypatch):
    tokenizer.save(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: " + "the quick brown fox jumps " * (1 + i % 4) for i in range(40)))
    data = {**MIXED, "sources": [MIXED["sources"][0], {**MIXED["sources"][1], "path": str(corpus)}]}
    patch_noise(monkeypatch)  # forked workers inherit the patch

    two = micro_config(tmp_path / "two", tmp_path, data=data, train={"batch_size": 16, "grad_accum": 2})
    with tempfile.NamedTemporaryFile() as rdv, patch_environment(
        world_size=2, master_addr="127.0.0.1", master_port=str(free_port()), accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=rdv.name, accelerate_use_cpu="yes", gloo_socket_ifname="lo",
    ):
        start_processes(PrepareForLaunch(_worker, debug=True), args=(two, str(tmp_path / "grads_{rank}.safetensors")),
                        nprocs=2, start_method="fork")

    one = micro_config(tmp_path / "one", tmp_path, data=data, train={"batch_size": 16, "grad_accum": 1})
    grads_of(one, str(tmp_path / "single_{rank}.safetensors"))

    ref = load_file(str(tmp_path / "single_0.safetensors"))
    ranks = [load_file(str(tmp_path / f"grads_{r}.safetensors")) for r in range(2)]
    f0, f1, fr = ranks[0].pop("__figures__"), ranks[1].pop("__figures__"), ref.pop("__figures__")
    # the processes really held different shares, so per-process normalization would be wrong
    assert f0[3:].tolist() != f1[3:].tolist()
    assert (f0[3:] + f1[3:]).tolist() == fr[3:].tolist()  # together: the whole global batch
    assert f0[1:3].tolist() == fr[1:3].tolist() == f1[1:3].tolist()  # global counts known to every process
    assert f0[0].item() == pytest.approx(fr[0].item(), rel=1e-6)  # the global loss
    assert set(ranks[0]) == set(ref) and len(ref) > 10
    for name, g in ref.items():
        for r in ranks:  # DDP leaves the same (averaged) gradient on every process
            torch.testing.assert_close(r[name], g, rtol=2e-5, atol=2e-7, msg=lambda m: f"{name}: {m}")
