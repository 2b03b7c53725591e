"""`mmgen train --model.init_from=DIR`: a tiny local Llama / Qwen2 checkpoint becomes the backbone (its
logits unchanged before training, the appended rows the mean of the others), trains through the real
trainer with its own tokenizer, and reloads identically through Pipeline and Chat; the clear errors of a
bad start; and `loss_on: assistant`, LM labels on assistant turns only."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_hf_tokenizer import TYPED, tiny_checkpoint
from train_helpers import micro_config, restore_threads  # noqa: F401 (autouse fixture)

from mmgen.chat import Chat
from mmgen.chat_template import assistant_targets
from mmgen.data.dialogues import DialogueSource
from mmgen.errors import ConfigError
from mmgen.pipeline import Pipeline
from mmgen.sequence import IGNORE, SequenceBuilder
from mmgen.tokenizers.hf_text import HFTextTokenizer
from mmgen.train.config import TrainConfig, load_config
from mmgen.train.data import Mixture, TrainDataset
from mmgen.train.overrides import build
from mmgen.train.packing import Packer
from mmgen.train.trainer import Trainer


def start_config(out, checkpoint, **sections) -> dict:
    """The micro training config of the other tests, its backbone and tokenizer from `checkpoint`."""
    cfg = micro_config(out, None, **sections)
    cfg["model"] = {"preset": "tiny", "init_from": str(checkpoint), "backbone": {"max_position_embeddings": 120},
                    "diffusion": {"objective": "flow"}}
    cfg["tokenizer"] = {"path": None}
    cfg["train"] = {**cfg["train"], "steps": 2, "ema_decay": 0.0}
    return cfg


def text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """mmgen's logits (B, T, V) of text-only ids."""
    b, t = ids.shape
    img = torch.full((b, t), -1)
    hidden, _ = model(model.embed(ids, img, None), torch.arange(t).expand(b, t), torch.zeros(b, t, dtype=torch.long),
                      img)
    return model.logits(hidden)


@pytest.mark.parametrize("style, tied, extra_rows, shard", [("llama", True, 0, False), ("qwen2", False, 5, True)])
def test_start_train_save_and_reload(style, tied, extra_rows, shard, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint(tmp_path / "ckpt", style, tied, extra_rows, shard)
    assert shard == (ckpt / "model.safetensors.index.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    trainer = Trainer(build(TrainConfig, start_config(tmp_path / "run", ckpt)))
    model, tok = trainer.model.eval(), trainer.tokenizer
    rows = hf.config.vocab_size
    assert isinstance(tok, HFTextTokenizer) and tok.base_size == rows
    assert model.config.backbone.vocab_size == len(tok) == rows + len(tok.appended)
    assert not (tmp_path / "run" / "tokenizer.model").exists()  # no mmgen tokenizer is trained
    ids = torch.randint(0, rows, (2, 23))
    with torch.no_grad():  # before any training: the checkpoint's logits on its own ids
        err = (text_logits(model, ids)[..., :rows] - hf(ids).logits).abs().max().item()
    assert err <= 1e-5
    for w in (model.model.embed_tokens.weight, model.lm_head.weight):
        torch.testing.assert_close(w[rows:], w[:rows].mean(0).expand(len(tok.appended), -1))
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    out = trainer.fit()
    assert not torch.equal(before, trainer.model.model.layers[0].mlp.up_proj.weight)  # it trained
    chat = Chat.from_pretrained(out)
    assert isinstance(chat.tokenizer, HFTextTokenizer) and chat.tokenizer.files() == tok.files()
    messages = [{"role": "user", "content": f"draw a handwritten digit 7 {TYPED}"}]
    reply = chat(messages, seed=1, max_new_tokens=6, image="never")
    assert reply == Chat(Pipeline(trainer.model, tok))(messages, seed=1, max_new_tokens=6, image="never")
    assert reply == Chat.from_pretrained(out)(messages, seed=1, max_new_tokens=6, image="never")
    caption = Pipeline.from_pretrained(out).caption([torch.zeros(1, 8, 8)])
    assert caption == Pipeline(trainer.model, tok).caption([torch.zeros(1, 8, 8)])


def test_resume_keeps_the_checkpoints_weights_and_tokenizer(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    cfg = start_config(tmp_path / "run", ckpt)
    Trainer(build(TrainConfig, cfg)).fit()
    again = Trainer(build(TrainConfig, {**cfg, "resume": "latest", "train": {**cfg["train"], "steps": 3}}))
    assert again.step == 2 and isinstance(again.tokenizer, HFTextTokenizer)
    trained = Pipeline.from_pretrained(tmp_path / "run").model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in again.model.state_dict().items())  # step 2, not the HF init


def write_config(directory, **fields):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


def test_bad_starts_are_named(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    gpt2 = write_config(tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    cases = [
        ({"model.init_from": str(tmp_path / "nowhere")}, "is not a directory"),
        ({"model.init_from": str(tmp_path)}, "has no config.json"),
        ({"model.init_from": str(gpt2)},
         r"model_type 'gpt2' \(GPT2LMHeadModel\) is not supported; .* llama \(LlamaForCausalLM\) and qwen2"),
        ({"model.init_from": str(ckpt), "model.backbone.hidden_size": 48},
         r"model.backbone.hidden_size = 48 conflicts with model.init_from: .*gives hidden_size = 32"),
        ({"model.init_from": str(ckpt), "model.backbone.vocab_size": 400}, "vocab_size = 400 conflicts"),
        ({"model.init_from": str(ckpt), "model.backbone.hiden_size": 32},
         "unknown config key 'model.backbone.hiden_size'"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_config("digits-tiny", overrides)
    bins = write_config(tmp_path / "bins", model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                        num_hidden_layers=1, num_attention_heads=1)
    (bins / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match=r"no \*.safetensors weights, only pickled \['pytorch_model.bin'\]"):
        load_config("digits-tiny", {"model.init_from": str(bins)})
    cfg = start_config(tmp_path / "run", ckpt)
    cfg["tokenizer"] = {"path": str(ckpt)}
    with pytest.raises(ConfigError, match="tokenizer.path = .* with model.init_from: the checkpoint's own tokenizer"):
        Trainer(build(TrainConfig, cfg))
    with pytest.raises(ConfigError, match="loss_on = 'assistant': 'all', or 'assistant' for a dialogues or edits"):
        load_config("digits-tiny", {"data.sources": [{"kind": "digits", "loss_on": "assistant"}]})


def test_assistant_turns_are_the_only_lm_targets(tokenizer):
    """A real rendered dialogue: labels are IGNORE exactly where the predicted token is not an assistant
    turn's content or its closing <|end|> (user text and images, role markers, <bos>, <eos>)."""
    source = DialogueSource(50, seed=0, channels=1, resolution=8, loss_on="assistant")
    builder = SequenceBuilder(tokenizer, 1, 8, 16, 512)
    dataset = TrainDataset([source], Mixture([len(source)], [1.0], 0), builder, seed=0)
    conversation = next(s for i in range(50) if len(s := source.sample(i, random.Random(i))) >= 4)
    item = dataset.tokenize(conversation, assistant_only=True)
    batch = Packer(tokenizer.pad_id, 1, 8, "pad")([item]).batch
    ids, labels = item.ids, batch.labels[0].tolist()
    turns, marker = [], None  # which turn each token belongs to, from the ids alone
    for t in ids:
        marker = {tokenizer.user_id: "user", tokenizer.assistant_id: "assistant"}.get(t, marker)
        turns.append(marker)
    for pos in range(len(ids) - 1):
        target, slot = ids[pos + 1], batch.image_id[0, pos + 1] >= 0 or batch.image_id[0, pos] >= 0
        wanted = (turns[pos + 1] == "assistant" and target not in (tokenizer.assistant_id, tokenizer.eos_id)
                  and not slot)
        assert (labels[pos] != IGNORE) == wanted, (pos, target)
        assert labels[pos] in (IGNORE, target)
    assert labels.count(IGNORE) < len(labels) and tokenizer.end_id in [ids[p + 1] for p in range(len(ids) - 1)
                                                                        if labels[p] != IGNORE]
    every = Packer(tokenizer.pad_id, 1, 8, "pad")([dataset.tokenize(conversation)]).batch.labels[0]
    assert (every != IGNORE).sum() > (batch.labels[0] != IGNORE).sum()  # "all": user turns are targets too
    word = tokenizer.encode("seven")[0]
    assert assistant_targets([tokenizer.user_id, word, tokenizer.end_id, tokenizer.assistant_id, word, tokenizer.end_id,
                              tokenizer.eos_id], tokenizer) == [False, False, False, False, True, True, False]
