"""`mmgen export-hf RUN OUT`: the text part of an mmgen model as a plain Hugging Face model directory.

OUT gets config.json (`LlamaForCausalLM`, or `Qwen2ForCausalLM` when the backbone has q/k/v biases:
HF Llama's `attention_bias` would also put a bias on o_proj, which mmgen's backbone has not), the
backbone's weights as model.safetensors, and the text tokenizer; every file is written atomically,
config.json last. `transformers.AutoModelForCausalLM.from_pretrained(OUT)` then gives mmgen's text-only
logits. The tokenizer:
  - a model started from a Hugging Face checkpoint (`--model.init_from`): that checkpoint's tokenizer
    files; the rows mmgen appended (its control tokens) are dropped from the embedding and the LM head,
    so the export has the original vocabulary;
  - a model with mmgen's SentencePiece tokenizer: tokenizer.model + tokenizer_config.json for
    transformers' `LlamaTokenizer` (loading it needs sentencepiece and protobuf); every row is kept, and
    <boi>, <|user|>, ... are special tokens of that tokenizer.
Images (interface, image tokenizer, heads, and the layers' image experts of a `--model.freeze=text` model: only
the HF-named weights of `hf_key_map` are written) are not exported; a backbone with QK-norm has no Llama / Qwen2
equivalent and is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor

from mmgen.checkpoint import hf_key_map
from mmgen.config import BackboneConfig
from mmgen.errors import ModelFileError, OutputError
from mmgen.files import CONFIG_FILE, WEIGHTS_FILE, atomic_write, save_file, write_json
from mmgen.outputs import check_output_dir
from mmgen.tokenizers.text_contract import TextTokenizerContract


def hf_config(backbone: BackboneConfig, vocab: int, tokenizer: TextTokenizerContract) -> dict:
    """config.json of the exported model, built by transformers' own config class (Llama or Qwen2)."""
    from transformers import LlamaConfig, Qwen2Config

    kind = Qwen2Config if backbone.attention_bias else LlamaConfig
    ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_id") for role in ("bos", "eos", "pad")}
    cfg = kind(
        vocab_size=vocab, hidden_size=backbone.hidden_size, intermediate_size=backbone.intermediate_size,
        num_hidden_layers=backbone.num_hidden_layers, num_attention_heads=backbone.num_attention_heads,
        num_key_value_heads=backbone.num_key_value_heads, head_dim=backbone.head_dim,
        max_position_embeddings=backbone.max_position_embeddings, rms_norm_eps=backbone.rms_norm_eps,
        rope_theta=backbone.rope_theta, tie_word_embeddings=backbone.tie_word_embeddings, hidden_act="silu",
        architectures=[f"{'Qwen2' if backbone.attention_bias else 'Llama'}ForCausalLM"],
        **{k: (i if i < vocab else None) for k, i in ids.items()},  # appended ids are not exported
    )
    return cfg.to_dict()


def text_weights(model, vocab: int) -> dict[str, Tensor]:
    """The backbone's tensors under their HF names; embedding and LM head cut to `vocab` rows."""
    params = dict(model.named_parameters())
    state = {}
    for hf_name, name in hf_key_map(model.config.backbone).items():
        if hf_name == "lm_head.weight" and model.config.backbone.tie_word_embeddings:
            continue  # tied: transformers ties it to model.embed_tokens.weight again
        x = params[name].detach()
        state[hf_name] = x[:vocab] if hf_name in ("model.embed_tokens.weight", "lm_head.weight") else x
    return state


def export_hf(run: str | Path, out: str | Path) -> Path:
    """Write the text part of the mmgen model in `run` to `out` as a Hugging Face directory; returns `out`.

    Raises:
        FileNotFoundError, ModelFileError: `run` is not a complete mmgen model directory (the message names the
            file), or its backbone uses QK-norm.
        OutputError: `out` cannot be written, or is `run` itself.
    """
    from mmgen.pipeline import Pipeline

    run, out = Path(run), Path(out)
    if out.resolve() == run.resolve():
        raise OutputError(f"OUT {out} is the model directory itself: its config.json would be replaced; choose another")
    pipe = Pipeline.from_pretrained(run)  # every file checked, the tokenizer checked to belong to the weights
    bb, tok = pipe.model.config.backbone, pipe.tokenizer
    if bb.qk_norm:
        raise ModelFileError(f"{run / CONFIG_FILE}: backbone.qk_norm = true has no field in Hugging Face Llama or "
                             "Qwen2 configs, so the export would compute other logits; train without qk_norm to export")
    vocab = tok.hf_vocab_size
    check_output_dir(out, "OUT")
    save_file(text_weights(pipe.model, vocab), out / WEIGHTS_FILE, metadata={"format": "pt"})
    for name, data in tok.hf_files().items():
        atomic_write(out / name, data)
    write_json(out / CONFIG_FILE, hf_config(bb, vocab, tok))
    return out


def cmd_export_hf(args: argparse.Namespace) -> None:
    out = export_hf(args.run, args.out)
    print(f"{out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) and "
          f"AutoTokenizer.from_pretrained({str(out)!r})")


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add `export-hf` to an argparse subparsers object; the command runs `args.fn(args)`."""
    p = subparsers.add_parser("export-hf", help="write the text part of a model as a Hugging Face Llama / Qwen2 "
                                                "directory", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="model directory (the output of `mmgen train`)")
    p.add_argument("out", help="output directory (gets config.json, model.safetensors, the tokenizer)")
    p.set_defaults(fn=cmd_export_hf)
    return p
