"""`mmgen export-hf RUN OUT`: the text part of a model as a plain Hugging Face directory that transformers
loads with the same logits (≤ 1e-5), generates from, and tokenizes text with like mmgen; for a model
started from a checkpoint, with that checkpoint's vocabulary and tokenizer again."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_hf_tokenizer import tiny_checkpoint
from test_pretrained_start import text_logits

from mmgen.checkpoint import load_hf_llama
from mmgen.cli import main
from mmgen.config import ImageConfig, ModelConfig
from mmgen.errors import ModelFileError, OutputError
from mmgen.export_hf import export_hf
from mmgen.model import MMGenModel
from mmgen.train.init_from import init_backbone, init_tokenizer

TEXTS = ["a handwritten digit 7", "draw a red circle", "hello! what can you do?"]


def started_model(checkpoint, run):
    """What `mmgen train --model.init_from=checkpoint` builds before training, saved in `run`."""
    tok = init_tokenizer(checkpoint)
    backbone = dataclasses.replace(init_backbone(checkpoint, {}), vocab_size=len(tok))
    model = MMGenModel(ModelConfig(backbone=backbone, image=ImageConfig())).eval()
    load_hf_llama(model, checkpoint)
    model.save_pretrained(run, tok)
    return model, tok


@pytest.mark.parametrize("style, tied", [("llama", True), ("qwen2", False)])
def test_a_started_model_exports_as_the_original_checkpoint(style, tied, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tiny_checkpoint(tmp_path / "ckpt", style, tied, extra_rows=3 if style == "qwen2" else 0)
    model, tok = started_model(ckpt, tmp_path / "run")
    main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == original["architectures"] and config["vocab_size"] == original["vocab_size"]
    hf, ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), AutoModelForCausalLM.from_pretrained(ckpt)
    ids = torch.randint(0, tok.base_size, (2, 19))
    with torch.no_grad():
        got = hf(ids).logits
        assert (got - text_logits(model, ids)[..., : tok.base_size]).abs().max().item() <= 1e-5
        assert (got - ref.eval()(ids).logits).abs().max().item() <= 1e-5
    assert hf.generate(ids[:1], max_new_tokens=4, do_sample=False).shape == (1, 23)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                              "tokenizer_config.json"}  # no mmgen record


def test_a_sentencepiece_model_exports_every_row(model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "run", tokenizer)
    out = export_hf(tmp_path / "run", tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.vocab_size == len(tokenizer)
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("a handwritten digit 7"), tokenizer.boi_id]])
    with torch.no_grad():
        assert (hf(ids).logits - text_logits(model, ids)).abs().max().item() <= 1e-5
    assert hf.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok.encode(text) == [tokenizer.bos_id, *tokenizer.encode(text)]


def test_what_cannot_be_exported_is_named(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "run", tokenizer)
    with pytest.raises(OutputError, match="is the model directory itself"):
        export_hf(tmp_path / "run", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["backbone"]["qk_norm"] = True
    qk = MMGenModel(ModelConfig.from_dict(config))
    qk.save_pretrained(tmp_path / "qk", tokenizer)
    with pytest.raises(ModelFileError, match="qk_norm = true has no field in Hugging Face Llama or Qwen2"):
        export_hf(tmp_path / "qk", tmp_path / "out")
    assert not (tmp_path / "out").exists()
