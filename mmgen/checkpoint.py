"""Hugging Face Llama / Qwen2 weights into an mmgen model, through one declarative key map.

Reads a local HF directory (`config.json` + `*.safetensors`, sharded or not); pickled `.bin`
checkpoints are refused. Rows the mmgen vocabulary adds (its control tokens) start as the mean of the
checkpoint's rows (`mmgen train --model.init_from=DIR`: `mmgen.train.init_from`); image experts (LMFusion), if
the model has them, start as copies of the loaded text weights. mmgen's own save / load is
`MMGenModel.save_pretrained` / `from_pretrained` (`mmgen.files`); the way back out is `mmgen.export_hf`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from mmgen.config import BackboneConfig
from mmgen.files import CONFIG_FILE

if TYPE_CHECKING:
    from mmgen.model import MMGenModel


# HF parameter name -> mmgen parameter name. The backbone uses HF names, so this is the identity
# on every backbone key; listing them keeps the contract in one place.
def hf_key_map(cfg: BackboneConfig) -> dict[str, str]:
    """HF parameter name -> mmgen parameter name for every backbone weight of `cfg`."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    per_layer = [
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight",
    ]
    if cfg.attention_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if cfg.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in per_layer]
    return {n: n for n in names}


def read_hf_config(directory: str | Path) -> BackboneConfig:
    """The `BackboneConfig` of an HF model directory's config.json; raises if the file is missing."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected a Hugging Face model directory")
    return BackboneConfig.from_hf(json.loads(path.read_text()))


def load_hf_llama(model: MMGenModel, directory: str | Path) -> None:
    """Copy a local HF Llama / Qwen2 checkpoint (config.json + *.safetensors, sharded or not) into `model`'s
    backbone. The backbone config must match; in a larger mmgen vocabulary the first rows of the embedding
    and LM head are the HF rows, the extra ones (the control tokens mmgen appends) their mean."""
    d = Path(directory)
    hf_cfg = read_hf_config(d)
    ours = model.config.backbone
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "rope_theta",
              "rms_norm_eps", "qk_norm"):
        if getattr(hf_cfg, f) != getattr(ours, f):
            raise ValueError(f"HF checkpoint has {f}={getattr(hf_cfg, f)}, the model has {getattr(ours, f)}")
    if hf_cfg.vocab_size > ours.vocab_size:
        raise ValueError(f"HF vocabulary ({hf_cfg.vocab_size}) is larger than the model's ({ours.vocab_size})")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {d} (pickled .bin checkpoints are not loaded)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    key_map = hf_key_map(ours)
    if ours.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        key_map.pop("lm_head.weight")
    missing = [k for k in key_map if k not in state]
    if missing:
        raise ValueError(f"HF checkpoint in {d} lacks {missing[:5]}{' …' if len(missing) > 5 else ''}")
    unused = [k for k in state if k not in key_map and not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ValueError(f"HF checkpoint in {d} has weights mmgen would drop: {unused[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for hf_name, name in key_map.items():
            src, dst = state[hf_name], params[name]
            if src.shape[0] != dst.shape[0] and name in ("model.embed_tokens.weight", "lm_head.weight"):
                dst[: src.shape[0]].copy_(src)
                dst[src.shape[0] :] = src.mean(0)  # appended tokens: the mean of the checkpoint's rows
            else:
                dst.copy_(src)
    if ours.image_experts:
        copy_text_to_experts(model)


@torch.no_grad()
def copy_text_to_experts(model: MMGenModel) -> None:
    """Set every layer's image expert (LMFusion) to a copy of that layer's text weights."""
    for layer in model.model.layers:
        expert = dict(layer.image_expert.named_parameters())
        for name, p in layer.named_parameters():
            if not name.startswith("image_expert."):
                expert[name].copy_(p)

