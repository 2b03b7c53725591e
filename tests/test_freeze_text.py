"""`--model.freeze=text` (LMFusion): after training through the real trainer from a tiny Llama / Qwen2, text-only
logits are the checkpoint's, the image loss went down, save -> load and export-hf give the same model; image
experts change image slots and the text after them (joint attention), never text-only inputs; cached ==
uncached generation; exact resume; two processes match one."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import test_generation as generation_checks
import torch
from accelerate.utils import PrepareForLaunch, patch_environment
from conftest import digit, micro_config
from safetensors.torch import load_file
from test_hf_tokenizer import TYPED, tiny_checkpoint
from test_pretrained_start import start_config, text_logits
from test_train_distributed import _worker, free_port, grads_of
from torch.multiprocessing import start_processes
from train_helpers import patch_noise, restore_threads  # noqa: F401 (autouse fixture)

from mmgen import capture
from mmgen.checkpoint import load_hf_llama
from mmgen.config import ImageConfig, ModelConfig
from mmgen.errors import ConfigError
from mmgen.export_hf import export_hf
from mmgen.generation import GenerationOptions
from mmgen.model import MMGenModel
from mmgen.pipeline import Pipeline
from mmgen.sequence import SequenceBuilder
from mmgen.train.config import TrainConfig, load_config
from mmgen.train.init_from import init_backbone, init_tokenizer
from mmgen.train.overrides import build
from mmgen.train.tracking import read_log
from mmgen.train.trainer import Trainer


def frozen_config(out, checkpoint, steps: int = 20, **train) -> dict:
    cfg = start_config(out, checkpoint)
    cfg["model"]["freeze"] = "text"
    cfg["train"] = {**cfg["train"], "steps": steps, "ema_decay": 0.5, **train}
    cfg["log"] = {**cfg["log"], "every": 5}
    cfg["checkpoint"] = {"every": 0, "keep": 1}
    return cfg


def hf_state(checkpoint) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.mark.parametrize("style, tied, extra_rows", [("llama", True, 0), ("qwen2", False, 5)])
def test_twenty_steps_keep_the_checkpoints_text_exactly(style, tied, extra_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint(tmp_path / "ckpt", style, tied, extra_rows)
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    trainer = Trainer(build(TrainConfig, frozen_config(tmp_path / "run", ckpt)))
    tok, rows = trainer.tokenizer, hf.config.vocab_size
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("image.") or ".image_expert." in n or n.endswith(".appended") for n in names)
    trained = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == trained  # no decay of frozen ones
    appended = trainer.model.model.embed_tokens.appended.detach().clone()
    out = trainer.fit()
    assert {id(p) for p in trainer.optimizer.optimizer.state} == trained  # AdamW moments: trained weights only
    model = trainer.model.eval()
    log = read_log(out)
    assert log[-1]["image"] < 0.9 * log[0]["image"]  # it learned to draw
    typed = tok.encode(TYPED)
    assert max(typed) < rows and not set(typed) & tok.special_ids  # typed control strings stay text
    with torch.no_grad():
        for ids in (torch.randint(0, rows, (2, 23)), torch.tensor([typed])):
            assert (text_logits(model, ids)[..., :rows] - hf(ids).logits).abs().max().item() <= 1e-5
    weights = dict(model.named_parameters())
    for name, x in hf_state(ckpt).items():  # every text weight bit-identical; the appended rows trained
        assert torch.equal(weights[name][: len(x)], x), name
    assert not torch.equal(model.model.embed_tokens.weight[rows:], appended)
    loaded = Pipeline.from_pretrained(out)
    assert loaded.model.config.backbone.image_experts
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.caption([digit(3)]) == Pipeline(model, tok).caption([digit(3)])
    export_hf(out, tmp_path / "hf")
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = hf_state(ckpt)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, rows, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)


def expert_model(tmp_path) -> tuple[MMGenModel, SequenceBuilder]:
    """A tiny Llama with image experts, loaded as `--model.freeze=text` starts it: experts = text copies."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    tok = init_tokenizer(ckpt)
    backbone = dataclasses.replace(init_backbone(ckpt, {"image_experts": True}), vocab_size=len(tok))
    model = MMGenModel(ModelConfig(backbone=backbone, image=ImageConfig())).eval()
    load_hf_llama(model, ckpt)
    return model, SequenceBuilder(tok, 1, 8, model.config.image.tokens_per_image, 96)


@torch.no_grad()
def test_experts_change_image_slots_and_later_text_never_text_alone(tmp_path):
    model, builder = expert_model(tmp_path)
    tok = builder.tok
    batch = builder([[tok.encode("draw a digit"), digit(3), tok.encode("a three")]])
    slots = batch.image_id[0] >= 0
    first = int(slots.nonzero()[0]) - 1  # <boi>: the last token that cannot see the image
    image = model.image.embed_patches(batch.images, torch.zeros(1))[0]

    def hidden(m):
        return m(m.embed(batch.ids, batch.image_id, image), batch.positions, batch.doc_id, batch.image_id)[0][0]

    plain = MMGenModel(dataclasses.replace(model.config, backbone=dataclasses.replace(
        model.config.backbone, image_experts=False))).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".image_expert." not in k})
    torch.testing.assert_close(hidden(model), hidden(plain), atol=1e-5, rtol=0)  # copies: the same model
    ids = torch.tensor([tok.encode("a handwritten digit seven")])
    before, text_only = hidden(model), text_logits(model, ids)
    for p in model.model.layers[0].image_expert.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    after = hidden(model)
    assert torch.equal(after[:first], before[:first])  # nothing before the image sees it
    assert (after[slots] - before[slots]).abs().amax(-1).min() > 1e-3  # every image slot changed
    later = ~slots & (torch.arange(len(slots)) > first)
    assert (model.logits(after[later]) - model.logits(before[later])).abs().amax(-1).min() > 1e-4  # joint attention
    assert torch.equal(text_logits(model, ids), text_only)  # text alone: the text weights only
    assert torch.equal(text_logits(plain, ids), text_only)


@pytest.mark.parametrize("mode", ["eager", "static"])  # static: the steps CUDA graphs capture (mmgen.capture)
def test_cached_generation_equals_uncached_with_experts(tokenizer, mode):
    torch.manual_seed(0)
    model = MMGenModel(micro_config(len(tokenizer), objective="flow", image_experts=True))
    with torch.no_grad():  # experts differ from the text weights (independent random init); images not flat
        model.image.proj_out.weight.normal_(0, 0.02)
    layer = model.model.layers[0]
    assert not torch.equal(layer.image_expert.mlp.up_proj.weight, layer.mlp.up_proj.weight)
    model.eval()
    builder = SequenceBuilder(tokenizer, 1, 8, model.config.image.tokens_per_image, 96)
    with capture.using(mode):
        generation_checks.test_cached_text_decoding_equals_uncached(model, builder, tokenizer)
        generation_checks.test_cached_denoiser_and_clean_pass_equal_uncached(model, builder, tokenizer, "flow")
        options = GenerationOptions(image_steps=2, guidance=2.0)
        drawn = Pipeline(model, tokenizer).draw(["a handwritten digit 3"], options)
    with capture.using("eager"):
        reference = Pipeline(model, tokenizer).draw(["a handwritten digit 3"], options)
    assert drawn[0].shape == (1, 8, 8)
    torch.testing.assert_close(drawn[0], reference[0], atol=1e-5, rtol=0)  # the static step routes image tokens too


def test_freeze_needs_a_checkpoint_and_keeps_its_experts(tmp_path):
    with pytest.raises(ConfigError, match="model.freeze=text and model.lora.rank keep pretrained text weights frozen"):
        load_config("digits-tiny", {"model.freeze": "text"})
    with pytest.raises(ConfigError, match="model.freeze = 'all': none, or text"):
        load_config("digits-tiny", {"model.freeze": "all"})
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="image_experts = false with model.freeze=text"):
        load_config("digits-tiny", {"model.init_from": str(ckpt), "model.freeze": "text",
                                    "model.backbone.image_experts": "false"})


def test_resume_is_exact(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "qwen2", tied=False)
    full = frozen_config(tmp_path / "full", ckpt, steps=4)
    full["model"]["lora"] = {"rank": 2}  # LoRA on the text path with the image experts
    full["checkpoint"] = {"every": 2, "keep": 2}
    Trainer(build(TrainConfig, full)).fit()
    middle = tmp_path / "full" / "checkpoints" / "step_00000002"
    resumed = Trainer(build(TrainConfig, {**full, "out": str(tmp_path / "cut"), "resume": str(middle)}))
    assert resumed.step == 2 and any(".lora_A." in n for n in resumed.names.values())
    resumed.fit()
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("lora" in k or "appended" in k for k in a)  # a plain mmgen model


def test_two_processes_match_one_process(tmp_path, monkeypatch):
    """DDP over gloo with frozen text weights: the trained parameters' gradients of two processes equal one
    process's with the whole batch, and frozen ones get none."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    patch_noise(monkeypatch)
    two = frozen_config(tmp_path / "two", ckpt, batch_size=16, grad_accum=2)
    with tempfile.NamedTemporaryFile() as rdv, patch_environment(
        world_size=2, master_addr="127.0.0.1", master_port=str(free_port()), accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=rdv.name, accelerate_use_cpu="yes", gloo_socket_ifname="lo",
    ):
        start_processes(PrepareForLaunch(_worker, debug=True), nprocs=2, start_method="fork",
                        args=(two, str(tmp_path / "grads_{rank}.safetensors")))
    grads_of(frozen_config(tmp_path / "one", ckpt, batch_size=16, grad_accum=1), str(tmp_path / "single_{rank}.safetensors"))
    ref = load_file(str(tmp_path / "single_0.safetensors"))
    ref.pop("__figures__")
    assert ref and all(k.startswith("image.") or ".image_expert." in k or k.endswith(".appended") for k in ref)
    for r in range(2):
        grads = load_file(str(tmp_path / f"grads_{r}.safetensors"))
        grads.pop("__figures__")
        assert grads.keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=2e-5, atol=2e-7, msg=lambda m: f"{name}: {m}")
