"""`mmgen train CONFIG --model.init_from=DIR`: start from a local Hugging Face Llama / Qwen2 checkpoint.

DIR holds config.json, *.safetensors (sharded or not; pickled .bin files are refused) and the tokenizer
(tokenizer.json). The backbone takes the checkpoint's shape (`init_backbone`); the text tokenizer is the
checkpoint's, with mmgen's control tokens appended (`init_tokenizer`, see `mmgen.tokenizers.hf_text`), so
`backbone.vocab_size` = the checkpoint's rows + the appended ones; the weights come in through
`mmgen.checkpoint.load_hf_llama`, the appended rows starting as the mean of the others. The preset still
gives the image and diffusion sections. With `resume`, the checkpoint being resumed wins: its weights and
tokenizer are loaded, and DIR only has to give the same backbone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmgen.config import BackboneConfig
from mmgen.errors import ConfigError, ModelFileError
from mmgen.files import CONFIG_FILE, read_json_object
from mmgen.tokenizers.hf_text import HFTextTokenizer
from mmgen.train.overrides import build

INIT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
FREE_FIELDS = ("max_position_embeddings", "initializer_range", "image_experts")  # not the checkpoint's to say


def checkpoint_config(directory: str | Path) -> dict:
    """config.json of the HF directory, checked: a supported architecture with safetensors weights.

    Raises:
        ConfigError: not a directory, no config.json, another architecture, no *.safetensors (only pickles).
    """
    d = Path(directory)
    where = f"model.init_from = {str(d)!r}"
    if not d.is_dir():
        raise ConfigError(f"{where} is not a directory: give a local Hugging Face model directory (config.json, "
                          "*.safetensors, tokenizer.json); nothing is downloaded")
    if not (d / CONFIG_FILE).is_file():
        raise ConfigError(f"{where} has no {CONFIG_FILE}: give the directory a Hugging Face model was saved to "
                          "with save_pretrained")
    try:
        hf = read_json_object(d / CONFIG_FILE, "give the config.json the checkpoint was saved with")
    except ModelFileError as e:
        raise ConfigError(f"{where}: {e}") from None
    kind = hf.get("model_type")
    if kind not in INIT_ARCHITECTURES:
        named = f"model_type {kind!r}" + (f" ({', '.join(hf['architectures'])})" if hf.get("architectures") else "")
        raise ConfigError(f"{where}: {named} is not supported; mmgen starts from "
                          f"{' and '.join(f'{k} ({v})' for k, v in INIT_ARCHITECTURES.items())} checkpoints")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: hidden_act={hf.get('hidden_act')!r}, use_sliding_window="
                          f"{hf.get('use_sliding_window')}: mmgen's backbone is SwiGLU (silu) with full attention")
    if not any(d.glob("*.safetensors")):
        pickles = sorted(p.name for p in d.glob("*.bin"))
        raise ConfigError(f"{where} has no *.safetensors weights" + (
            f", only pickled {pickles}, which mmgen does not load (unpickling can run code); convert them once "
            "where you trust the file: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)" if pickles
            else ": save the model with save_pretrained (safetensors is its default)"))
    return hf


def init_backbone(directory: str | Path, overrides: dict) -> BackboneConfig:
    """The backbone of a run started from the checkpoint in `directory`: its config.json's shape.

    Args:
        overrides: the config's `model.backbone` keys; `max_position_embeddings`, `initializer_range` and
            `image_experts` (set by `model.freeze=text`) may differ from the checkpoint's, any other key must
            equal its value, and `vocab_size` (the
            checkpoint's rows + mmgen's appended tokens) cannot be set.
    Raises:
        ConfigError: the directory is not a supported local checkpoint, or an override conflicts with it.
    """
    d = Path(directory)
    try:
        cfg = BackboneConfig.from_hf(checkpoint_config(d))
    except ValueError as e:
        raise ConfigError(f"model.init_from = {str(d)!r}: {e}") from None
    wanted = build(BackboneConfig, {**dataclasses.asdict(cfg), **overrides}, "model.backbone.")  # typed, checked
    for key, value in overrides.items():
        if key == "vocab_size" or (key not in FREE_FIELDS and getattr(wanted, key) != getattr(cfg, key)):
            theirs = getattr(cfg, key) if key != "vocab_size" else "the checkpoint's tokenizer + mmgen's tokens"
            raise ConfigError(f"model.backbone.{key} = {value!r} conflicts with model.init_from: "
                              f"{d / CONFIG_FILE} gives {key} = {theirs}; the backbone takes the checkpoint's "
                              f"shape, so remove model.backbone.{key}")
    return wanted


def init_tokenizer(directory: str | Path) -> HFTextTokenizer:
    """The checkpoint's tokenizer with mmgen's tokens appended after its embedding rows (config.json's
    vocab_size, which may exceed the tokenizer's size); a ConfigError if it has no tokenizer.json."""
    d = Path(directory)
    rows = BackboneConfig.from_hf(checkpoint_config(d)).vocab_size
    try:
        return HFTextTokenizer.load(d, base_size=rows)
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e}") from None
