"""Dataclass configs for every component, and named model presets.

`ModelConfig` is what `save_pretrained` writes to `config.json`: the backbone
(LLaMA hyper-parameters, HF names), the continuous image interface and the
diffusion objective. Presets are plain factories in `PRESETS`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Special tokens every mmgen text tokenizer reserves, in id order after <pad> <unk> <bos> <eos>.
CONTROL_TOKENS = ("<boi>", "<eoi>", "<|user|>", "<|assistant|>", "<|end|>")


@dataclass
class BackboneConfig:
    """LLaMA decoder hyper-parameters (names follow HF `LlamaConfig`)."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2-style q/k/v biases
    qk_norm: bool = False  # Chameleon / Qwen3-style per-head RMSNorm on q and k
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BackboneConfig:
        """Map a Hugging Face Llama/Qwen2-style `config.json` dict onto this config."""
        if hf.get("model_type") not in (None, "llama", "qwen2"):
            raise ValueError(f"unsupported model_type {hf.get('model_type')!r}: expected 'llama' (or 'qwen2')")
        unsupported = [k for k in ("mlp_bias",) if hf.get(k)]
        if hf.get("model_type", "llama") == "llama" and hf.get("attention_bias"):
            unsupported.append("attention_bias (Llama's also puts a bias on o_proj)")
        if unsupported:
            raise ValueError(f"unsupported HF Llama options: {', '.join(unsupported)}")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ValueError("only default RoPE is supported; this checkpoint uses RoPE scaling")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10_000.0)),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", hf.get("model_type") == "qwen2"),
        )


@dataclass
class ImageConfig:
    """Continuous image interface: raw pixels (or latents) cut into p×p patches."""

    channels: int = 1
    resolution: int = 8
    patch_size: int = 2

    def __post_init__(self) -> None:
        if self.resolution % self.patch_size:
            raise ValueError(f"resolution={self.resolution} is not divisible by patch_size={self.patch_size}")

    @property
    def grid(self) -> int:
        return self.resolution // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2


@dataclass
class DiffusionConfig:
    """Training objective of the continuous path (DESIGN §4)."""

    objective: str = "eps"  # "eps" / "v": ε- / v-prediction, cosine VP schedule; "flow": flow matching
    loss_weight: float = 5.0  # λ in L = L_LM + λ·L_diffusion
    max_t_when_conditioning: float = 0.5  # noise cap for an image that precedes its caption
    z_loss: float = 0.0  # PaLM/Chameleon z-loss on the LM logits (1e-5 when used)

    def __post_init__(self) -> None:
        if self.objective not in ("eps", "v", "flow"):
            raise ValueError(f"diffusion objective must be 'eps', 'v' or 'flow', got {self.objective!r}")


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        parts = {"backbone": BackboneConfig, "image": ImageConfig, "diffusion": DiffusionConfig}
        unknown = set(d) - set(parts)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected {sorted(parts)}")
        kwargs = {}
        for name, klass in parts.items():
            sub = dict(d.get(name, {}))
            names = {f.name for f in dataclasses.fields(klass)}
            bad = set(sub) - names
            if bad:
                raise ValueError(f"unknown keys {sorted(bad)} in config section {name!r}; valid keys: {sorted(names)}")
            kwargs[name] = klass(**sub)
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def tiny(**image: Any) -> ModelConfig:
    """~3M parameters: trains on the bundled 8×8 digits in minutes on a laptop CPU."""
    return ModelConfig(
        backbone=BackboneConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        image=ImageConfig(**image),
    )


def small(**image: Any) -> ModelConfig:
    """~25M parameters."""
    return ModelConfig(
        backbone=BackboneConfig(
            hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=1024,
        ),
        image=ImageConfig(**image),
    )


def base(**image: Any) -> ModelConfig:
    """~160M parameters: a GPU preset."""
    return ModelConfig(
        backbone=BackboneConfig(
            hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32_000,
        ),
        image=ImageConfig(**image),
    )


PRESETS = {"tiny": tiny, "small": small, "base": base}
