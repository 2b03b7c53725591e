"""Save/load: `config.json` + `model.safetensors` (+ `tokenizer.model`), and HF Llama import.

Nothing is unpickled: weights are safetensors, configs JSON. Files are written to a temporary
name and renamed, so an interrupted save never leaves a half-written file under the real name.
HF Llama/Qwen2 weights come in through one declarative key map.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model

from mmgen.config import BackboneConfig, ModelConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(model, directory: str | Path, tokenizer=None) -> None:
    """Write config.json, model.safetensors and (if given) the text tokenizer to `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / WEIGHTS, lambda p: save_model(model, str(p), metadata={"format": "pt"}))
    if tokenizer is not None:
        from mmgen.tokenizers.text import FILENAME

        _atomic_write(d / FILENAME, lambda p: p.write_bytes(tokenizer.model_proto))
    _atomic_write(d / CONFIG, lambda p: model.config.save(p))


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a model saved by `save_pretrained`; raises naming any missing or mismatched file."""
    from mmgen.model import MMGenModel

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing: not a complete mmgen model directory")
    model = MMGenModel(ModelConfig.load(d / CONFIG))
    missing, unexpected = load_model(model, str(d / WEIGHTS), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(
            f"{d / WEIGHTS} does not match {d / CONFIG}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval()


# HF parameter name -> mmgen parameter name. The backbone uses HF names, so this is the identity
# on every backbone key; listing them keeps the contract in one place.
def hf_key_map(cfg: BackboneConfig) -> dict[str, str]:
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
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected a Hugging Face model directory")
    return BackboneConfig.from_hf(json.loads(path.read_text()))


def load_hf_llama(model, directory: str | Path) -> None:
    """Copy a local HF Llama checkpoint (config.json + *.safetensors, sharded or not) into `model`'s
    backbone. The backbone config must match; a larger mmgen vocabulary keeps its extra rows (the
    special tokens mmgen adds) and takes the HF rows for the rest."""
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
            else:
                dst.copy_(src)
