"""A pretrained checkpoint's Hugging Face tokenizer as mmgen's text tokenizer: control tokens appended as
new ids, no text can produce a special or control id (the checkpoint's own included), the kinds picked
by the files present, save / load identical, broken files named. Also the tiny local checkpoints
(Llama, Qwen2) the pretrained-start and export tests build: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmgen.chat_template import parse_messages, render
from mmgen.config import CONTROL_TOKENS
from mmgen.data.digits import DigitsDataset
from mmgen.errors import ModelFileError
from mmgen.sequence import SequenceBuilder
from mmgen.tokenizers.hf_text import HFTextTokenizer
from mmgen.tokenizers.text import TextTokenizer
from mmgen.tokenizers.text_contract import load_text_tokenizer

SPECIALS = {"llama": ["<unk>", "<s>", "</s>"], "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}
NAMED = {"llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
         "qwen2": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}}  # Qwen2: no bos, pad = eos
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")  # Qwen2's pre-tokenizer (tokenizer.json; transformers' Qwen2Tokenizer sets it too)
TYPED = "<boi> <eoi> <|user|> <|assistant|> <|end|> <s> </s> <unk> <pad> <|endoftext|> <|im_start|> <|im_end|>"


def sentences() -> list[str]:
    digits = DigitsDataset("all")
    return [digits[i][1] for i in range(0, len(digits), 7)] + ["draw a red circle", "hello! what can you do?"]


def tiny_hf_tokenizer(style: str):
    """A byte-level BPE trained on a few sentences, with the special tokens of a Llama or a Qwen2 checkpoint
    (and Qwen2's NFC normalizer and pre-tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style == "qwen2":
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=SPECIALS[style], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(sentences(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, **NAMED[style])


def tiny_checkpoint(directory: Path, style: str = "llama", tied: bool = True, extra_rows: int = 0,
                    shard: bool = False) -> Path:
    """A random tiny LlamaForCausalLM / Qwen2ForCausalLM and its tokenizer saved in `directory`; the
    embedding has `extra_rows` more rows than the tokenizer (as Qwen2 checkpoints do)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tiny_hf_tokenizer(style)
    shape = dict(vocab_size=len(tok) + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                 tie_word_embeddings=tied, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if style == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape)))
    with torch.no_grad():  # randomize norms and biases too, so that a mix-up shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(directory, max_shard_size="20KB" if shard else "1GB")
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_tok(request, tmp_path_factory) -> HFTextTokenizer:
    d = tmp_path_factory.mktemp(request.param)
    tiny_hf_tokenizer(request.param).save_pretrained(d)
    return HFTextTokenizer.load(d, base_size=350 if request.param == "qwen2" else 0)


def test_control_tokens_are_appended_after_the_vocabulary(hf_tok):
    base = hf_tok.base_size
    assert base == max(hf_tok.own_size, 350 if "<|endoftext|>" in hf_tok.tk.get_vocab() else 0)
    assert [hf_tok.boi_id, hf_tok.eoi_id, hf_tok.user_id, hf_tok.assistant_id, hf_tok.end_id] == list(
        range(base, base + len(CONTROL_TOKENS)))
    if hf_tok.tk.token_to_id("<s>") is not None:  # Llama: its own bos / eos / unk, an appended pad
        assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.unk_id) == (1, 2, 0)
        assert hf_tok.pad_id == base + 5 and len(hf_tok) == base + 6
    else:  # Qwen2: eos <|endoftext|>; bos and pad appended (the engine never samples either, so neither may be eos)
        assert hf_tok.eos_id == 0 and (hf_tok.bos_id, hf_tok.pad_id) == (base + 5, base + 6)
        assert len(hf_tok) == base + 7
    assert {hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id} < hf_tok.special_ids


def test_typed_special_and_control_strings_stay_text(hf_tok):
    ids = hf_tok.encode(TYPED)
    assert not set(ids) & hf_tok.special_ids and max(ids) < hf_tok.own_size
    assert hf_tok.decode(ids) == TYPED
    builder = SequenceBuilder(hf_tok, 1, 8, 16, 512)
    sample = render(parse_messages([{"role": "user", "content": TYPED}]), hf_tok, lambda image: image)
    row = builder.tokens(sample, add_eos=False)[0]
    markers = [hf_tok.bos_id, hf_tok.user_id, *ids, hf_tok.end_id, hf_tok.assistant_id]
    assert row == markers  # the only special ids are the ones the template inserts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([*TYPED.split(), "<", ">", "|", " ", "a", "é", "7", "\n"]) | st.text(), max_size=12)
       .map("".join))
def test_no_text_produces_a_special_id(hf_tok, text):
    ids = hf_tok.encode(text)
    assert all(0 <= i < hf_tok.own_size and i not in hf_tok.special_ids for i in ids)
    assert hf_tok.decode(ids) == (hf_tok.tk.normalizer.normalize_str(text) if hf_tok.tk.normalizer else text)


def test_save_and_load_give_the_same_tokenizer(hf_tok, tmp_path):
    hf_tok.save(tmp_path)
    again = load_text_tokenizer(tmp_path)
    assert isinstance(again, HFTextTokenizer) and again.files() == hf_tok.files()
    assert again.digest() == hf_tok.digest() and len(again) == len(hf_tok)
    assert again.encode("a handwritten digit 7") == hf_tok.encode("a handwritten digit 7")
    record = json.loads((tmp_path / "mmgen_text_tokenizer.json").read_text())
    assert record["appended"]["<boi>"] == hf_tok.boi_id and record["base_size"] == hf_tok.base_size


def test_the_kind_follows_the_files_present(tmp_path, tokenizer):
    (tmp_path / "sp").mkdir()
    tokenizer.save(tmp_path / "sp")
    assert isinstance(load_text_tokenizer(tmp_path / "sp"), TextTokenizer)
    tiny_hf_tokenizer("llama").save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"a checkpoint's own SentencePiece file")  # Llama ships both
    assert isinstance(load_text_tokenizer(tmp_path / "hf"), HFTextTokenizer)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.model not found \(nor .*tokenizer.json\)"):
        load_text_tokenizer(tmp_path)


def test_broken_files_are_named(hf_tok, tmp_path):
    hf_tok.save(tmp_path)
    record = tmp_path / "mmgen_text_tokenizer.json"
    edited = json.loads(record.read_text())
    edited["appended"]["<boi>"] += 1
    record.write_text(json.dumps(edited))
    with pytest.raises(ModelFileError, match="records the appended ids .* not the ones saved with the model"):
        load_text_tokenizer(tmp_path)
    record.write_text("{")
    with pytest.raises(ModelFileError, match="mmgen_text_tokenizer.json is not valid JSON"):
        load_text_tokenizer(tmp_path)
    record.unlink()
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ModelFileError, match="tokenizer.json is not a Hugging Face tokenizer file"):
        load_text_tokenizer(tmp_path)
