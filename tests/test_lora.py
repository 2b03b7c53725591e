"""LoRA on the text path (`--model.lora.rank`, through peft): only the adapters (+ the image interface and the
appended control rows) train, the text weights stay as loaded, and the saved model is a plain mmgen model with
the adapters merged, equal to the model trained in memory."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file
from test_hf_tokenizer import tiny_checkpoint
from test_pretrained_start import start_config, text_logits
from train_helpers import restore_threads  # noqa: F401 (autouse fixture)

from mmgen.errors import ConfigError
from mmgen.model import MMGenModel
from mmgen.train.config import TrainConfig, load_config
from mmgen.train.overrides import build
from mmgen.train.trainer import Trainer


def lora_config(out, checkpoint, **lora) -> dict:
    cfg = start_config(out, checkpoint)
    cfg["model"]["lora"] = {"rank": 4, **lora}
    cfg["train"] = {**cfg["train"], "steps": 4}
    cfg["checkpoint"] = {"every": 4, "keep": 1}
    return cfg


def test_adapters_train_and_merge_into_a_plain_model(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "qwen2", tied=False)
    original = load_file(str(ckpt / "model.safetensors"))
    trainer = Trainer(build(TrainConfig, lora_config(tmp_path / "run", ckpt)))
    model, bb = trainer.model, trainer.model.config.backbone
    kv = bb.num_key_value_heads * bb.head_dim
    shapes = [(bb.hidden_size, bb.hidden_size), (bb.hidden_size, kv), (bb.hidden_size, kv), (bb.hidden_size,
              bb.hidden_size), (bb.hidden_size, bb.intermediate_size), (bb.hidden_size, bb.intermediate_size),
              (bb.intermediate_size, bb.hidden_size)]  # (in, out) of q k v o gate up down
    adapters = bb.num_hidden_layers * sum(4 * (i + o) for i, o in shapes)
    image = sum(p.numel() for p in model.image.parameters() if p.requires_grad)
    rows = 2 * (bb.vocab_size - original["model.embed_tokens.weight"].shape[0]) * bb.hidden_size  # embed + head
    assert model.num_parameters(trainable_only=True) == adapters + image + rows
    out = trainer.fit()
    resumed = Trainer(build(TrainConfig, {**lora_config(tmp_path / "run", ckpt), "resume": "latest"}))
    unmerged = resumed.model.eval()  # step 4 with its adapters apart, as the checkpoint holds them
    weights = {n.replace(".base_layer", ""): p for n, p in unmerged.named_parameters()}  # peft's names -> HF's
    for name, x in original.items():  # the text weights stayed as loaded
        assert torch.equal(weights[name][: len(x)], x), name
    merged = MMGenModel.from_pretrained(out)
    assert not any("lora" in k or "appended" in k for k in merged.state_dict())  # a plain mmgen model
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in merged.state_dict().items())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], original[q])  # the adapters learned something
    ids = torch.randint(0, len(trainer.tokenizer), (2, 17))
    with torch.no_grad():
        assert (text_logits(merged, ids) - text_logits(unmerged, ids)).abs().max().item() <= 1e-5


def test_lora_options_are_checked(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    base = {"model.init_from": str(ckpt)}
    with pytest.raises(ConfigError, match=r"model.lora.targets = \['qproj'\]: give one or more of q_proj"):
        load_config("digits-tiny", {**base, "model.lora.rank": 4, "model.lora.targets": "qproj"})
    with pytest.raises(ConfigError, match="rank must be >= 0 .* dropout in"):
        load_config("digits-tiny", {**base, "model.lora.rank": 4, "model.lora.dropout": 1.5})
    with pytest.raises(ConfigError, match="keep pretrained text weights frozen: set model.init_from"):
        load_config("digits-tiny", {"model.lora.rank": 4})
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"model.lora.rank needs the peft package.*pip install 'peft"):
        Trainer(build(TrainConfig, lora_config(tmp_path / "run", ckpt)))
