"""Dataclass configs for every component, and named model presets.

`ModelConfig` is what `save_pretrained` writes to `config.json`: the backbone (LLaMA
hyper-parameters, HF names), the image side (interface, image tokenizer, MLP head) and the
diffusion objective. Each config checks its own fields' ranges (a `ConfigError` naming the field);
`ModelConfig.from_dict` first checks every key and value type of a `config.json` dict
(`mmgen.config_check`); what an image interface needs of the image config is checked by the
interface (`mmgen.interfaces.registry.check_image_config`). Presets are plain factories in `PRESETS`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgen.config_check import build
from mmgen.errors import ConfigError, ModelFileError, check_choice, check_number

# Special tokens every mmgen text tokenizer reserves, in id order after <pad> <unk> <bos> <eos>.
CONTROL_TOKENS = ("<boi>", "<eoi>", "<|user|>", "<|assistant|>", "<|end|>")


def _at_least(config: Any, low: float, *names: str, integer: bool = True, low_open: bool = False) -> None:
    """Raise a ConfigError naming the first of the fields `names` of `config` that is not a number >= `low`
    (> `low` when `low_open`; an int when `integer`), e.g. "num_hidden_layers = 0: must be an integer in [1, inf]"."""
    for name in names:
        check_number(name, getattr(config, name), low=low, low_open=low_open, integer=integer, error=ConfigError)


IMAGE_POSITIONS = ("1d", "2d")


@dataclass
class BackboneConfig:
    """LLaMA decoder hyper-parameters (names follow HF `LlamaConfig`), plus where image slots sit in RoPE.

    image_positions:
        "1d": every token, image slots included, takes the next sequence position (the default; as before).
        "2d": M-RoPE (Qwen2-VL, interleaved as in Qwen3-VL): the head's rotary frequency pairs are shared
              out among sequence / row / column, pair j to component j mod 3 (`mmgen.positions.section_index`),
              so each spans fast and slow frequencies; text has one position in all three (text-only
              sequences equal "1d" exactly), image slot (r, c) of an image starting at p has (p, p + r, p + c),
              and the text after a g×g image continues from p + g. For the "diffusion" interface only.
    """

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
    image_experts: bool = False  # LMFusion: image slots run through their own copy of each layer's weights
    image_positions: str = "1d"  # RoPE positions of image slots: "1d" or "2d" (M-RoPE; see `mmgen.positions`)

    def __post_init__(self) -> None:
        check_choice("image_positions", self.image_positions, IMAGE_POSITIONS, error=ConfigError)
        _at_least(self, 1, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        _at_least(self, 0, "rms_norm_eps", "rope_theta", integer=False, low_open=True)
        _at_least(self, 0, "initializer_range", integer=False)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _at_least(self, 2, "head_dim")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = {self.head_dim}: must be even (rotary embeddings turn pairs of channels); "
                              "set head_dim, or a hidden_size / num_attention_heads that is even")

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


IMAGE_TOKENIZER_KINDS = ("pixels", "vae", "vq", "hybrid", "diffusers")


@dataclass
class ImageTokenizerConfig:
    """An image tokenizer: images (C, R, R) in [-1, 1] <-> tokens on a (R/f)×(R/f) grid.

    kind:
        "pixels":    the identity (latents are the pixels; f = 1).
        "vae":       convolutional KL autoencoder, continuous latents.
        "vq":        convolutional VQ autoencoder, one code per grid cell.
        "hybrid":    HART: codes plus the continuous residual latent − dequantize(codes).
        "diffusers": a diffusers `AutoencoderKL` loaded from the local directory `path`.
    Continuous latents are handed to the model as (latent − latent_shift)·latent_scale, both
    computed from data when the tokenizer is trained (SD's 0.18215 plays the role of latent_scale).
    """

    kind: str = "pixels"
    channels: int = 1  # image channels (1 grey, 3 RGB)
    resolution: int = 8  # image side in pixels
    latent_channels: int = 1
    downsample: int = 1  # f: pixels per latent cell along each side
    codebook_size: int = 0  # K, for "vq" and "hybrid"
    width: int = 64  # channels of the first conv stage; doubled at each downsampling
    res_blocks: int = 1  # residual blocks per stage
    latent_shift: float = 0.0
    latent_scale: float = 1.0
    path: str | None = None  # "diffusers": local directory of the AutoencoderKL

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_TOKENIZER_KINDS:
            raise ConfigError(f"unknown image tokenizer kind {self.kind!r}; choose from {IMAGE_TOKENIZER_KINDS}")
        _at_least(self, 1, "channels", "resolution", "latent_channels", "downsample", "width")
        _at_least(self, 0, "codebook_size", "res_blocks")
        _at_least(self, 0, "latent_scale", integer=False, low_open=True)
        check_number("latent_shift", self.latent_shift, error=ConfigError)
        if self.downsample & (self.downsample - 1):
            raise ConfigError(f"downsample = {self.downsample}: must be a power of 2 (1, 2, 4, 8, ...)")
        if self.resolution % self.downsample:
            raise ConfigError(f"resolution={self.resolution} is not divisible by downsample={self.downsample}")
        if self.kind == "pixels" and (self.downsample != 1 or self.latent_channels != self.channels):
            raise ConfigError("the 'pixels' tokenizer has downsample=1 and latent_channels=channels")
        if self.kind in ("vq", "hybrid") and self.codebook_size < 2:
            raise ConfigError(f"a {self.kind!r} tokenizer needs codebook_size >= 2, got {self.codebook_size}")
        if self.kind in ("pixels", "vae", "diffusers") and self.codebook_size:
            raise ConfigError(f"a {self.kind!r} tokenizer is continuous: codebook_size must be 0")

    @property
    def grid(self) -> int:
        """Latent cells along each side."""
        return self.resolution // self.downsample

    @property
    def discrete(self) -> bool:
        return self.codebook_size > 0


@dataclass
class HeadConfig:
    """Per-token MLP diffusion head (MAR / HART): residual MLP blocks with adaptive LayerNorm."""

    width: int = 256
    depth: int = 3  # residual blocks
    objective: str = "flow"
    repeat: int = 4  # noise levels drawn per token per training step (MAR's diffusion_batch_mul)
    steps: int = 8  # default sampling steps (HART uses 8)
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _at_least(self, 1, "width", "repeat", "steps")
        _at_least(self, 0, "depth")
        _at_least(self, 0, "loss_weight", integer=False)
        if self.objective not in ("eps", "v", "flow"):
            raise ConfigError(f"head objective must be 'eps', 'v' or 'flow', got {self.objective!r}")


DEFAULT_CODE_INPUT_NOISE = 0.2  # ImageConfig.code_input_noise when images are read as latents or features


PATCH_ENCODERS = ("linear", "unet")


@dataclass
class ImageConfig:
    """How images meet the backbone.

    interface: a key of `mmgen.interfaces.registry.INTERFACES`, which checks the rest of this config:
        "diffusion": Transfusion. Continuous latents, p×p patches denoised inside the backbone with
                     bidirectional attention within each image.
        "discrete":  Chameleon. VQ codes predicted as next tokens, raster order, causal.
        "hybrid":    HART. Codes as next tokens, plus each token's continuous residual sampled by the
                     per-token MLP head from the hidden state that predicted the code.
        "mar":       continuous tokens predicted one after another, each sampled by the MLP head.
    understanding_input: how an image the model reads (one that precedes its text, a prompt image, an
        image already drawn) enters the backbone; images the model writes are always its own tokens.
        A key of `mmgen.interfaces.understanding.UNDERSTANDING` ("latents", "encoder") or "codes";
        the causal interfaces take any, "diffusion" only "codes" (Janus / ILLUME+ decoupling):
        "codes":   the interface's own token embedding (codes, or mar's continuous tokens).
        "latents": the tokenizer's continuous latents before quantization, p×p cells per token,
                   through a trainable 2-layer MLP.
        "encoder": patch features of the frozen vision model in `understanding_encoder`, pooled to the
                   token grid, through a trainable 2-layer MLP (LLaVA / Janus).
    understanding_encoder: a local Hugging Face vision model directory (SigLIP, CLIP vision, DINOv2),
        for understanding_input="encoder"; the encoder travels with a saved model (its weights in
        model.safetensors, its config in understanding_encoder.json), so the directory is needed only to build.
    code_input_noise: noisy teacher forcing for the code interfaces ("discrete", "hybrid"): in training,
        up to this share (uniform per image) of an image's input codes is replaced by random codes
        while its targets stay the true codes, so drawing recovers from its own sampling mistakes.
        Images read as codes already get it (the capped corruption of `max_t_when_conditioning`);
        with another understanding_input the codes are only ever seen clean, and this is the knob.
        None (default): `DEFAULT_CODE_INPUT_NOISE` when understanding_input is not "codes", else 0
        (`input_code_noise` gives the value in use).
    patch_encoder: how the "diffusion" interface maps latents to tokens and hidden states back:
        "linear": one linear layer per p×p patch each way (the default).
        "unet":   timestep-conditioned U-Net down / up blocks with skips (`mmgen.heads.unet`, Transfusion
                  §4.3), `unet_channels` wide at the latent resolution, doubling per halving; patch_size
                  must be a power of two. `unet_skips` False drops the skips, so the decoder sees only the
                  tokens (the skips let it denoise around the backbone, and the caption: docs/emoji.md).
    """

    interface: str = "diffusion"
    tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    patch_size: int = 2  # latent cells per token along each side ("diffusion" and "mar")
    head: HeadConfig = field(default_factory=HeadConfig)
    understanding_input: str = "codes"
    understanding_encoder: str | None = None
    code_input_noise: float | None = None
    patch_encoder: str = "linear"
    unet_channels: int = 32
    unet_skips: bool = True

    def __post_init__(self) -> None:
        if self.code_input_noise is not None:
            check_number("code_input_noise", self.code_input_noise, low=0, high=1, error=ConfigError)
        if isinstance(self.tokenizer, dict):
            self.tokenizer = build(ImageTokenizerConfig, self.tokenizer, "tokenizer")
        if isinstance(self.head, dict):
            self.head = build(HeadConfig, self.head, "head")
        _at_least(self, 1, "patch_size", "unet_channels")
        check_choice("patch_encoder", self.patch_encoder, PATCH_ENCODERS, error=ConfigError)
        if self.patch_encoder == "unet" and self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"patch_encoder='unet' halves the latent grid per level, so patch_size must be a "
                              f"power of two (1, 2, 4, 8, ...), got {self.patch_size}")
        if self.tokenizer.grid % self.patch_size:
            raise ConfigError(f"latent grid {self.tokenizer.grid} is not divisible by patch_size={self.patch_size}")

    @property
    def input_code_noise(self) -> float:
        """The code_input_noise in use: as set, else DEFAULT_CODE_INPUT_NOISE for codes read another way than
        as codes (measured on the digits: drawing at guidance 3 fell to 63% without it, 99% with 0.2)."""
        if self.code_input_noise is not None:
            return self.code_input_noise
        return DEFAULT_CODE_INPUT_NOISE if self.understanding_input != "codes" and self.tokenizer.discrete else 0.0

    @property
    def channels(self) -> int:
        return self.tokenizer.channels

    @property
    def resolution(self) -> int:
        return self.tokenizer.resolution

    @property
    def grid(self) -> int:
        """Tokens along each side of an image."""
        return self.tokenizer.grid // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        """Continuous values per token: latent channels × p × p."""
        return self.tokenizer.latent_channels * self.patch_size**2


T_SAMPLING = ("uniform", "logit_normal")


@dataclass
class DiffusionConfig:
    """Training objective of the continuous path (DESIGN §4).

    t_sampling: how training draws each image's noise time t ∈ [0, 1] (t = 1 is pure noise here, as in SD3),
        through the training generator (`mmgen.diffusion.objective.draw_times`):
        "uniform":      t ~ U(0, 1) (the default; as before).
        "logit_normal": t = sigmoid(t_mean + t_std·n), n ~ N(0, 1) (SD3, Esser et al. 2024 §3.1): mass in the
                        middle of the schedule; t_mean > 0 leans to noisier t, < 0 to cleaner.
        An image that precedes its caption then has t scaled by max_t_when_conditioning. Used by the
        "diffusion" interface; the MLP head of "hybrid" / "mar" draws its own uniform t.
    """

    objective: str = "eps"  # "eps" / "v": ε- / v-prediction, cosine VP schedule; "flow": flow matching
    loss_weight: float = 5.0  # λ in L = L_LM + λ·L_diffusion
    max_t_when_conditioning: float = 0.5  # noise cap for an image that precedes its caption (for codes: the
    # largest share of input codes replaced by random ones)
    z_loss: float = 0.0  # PaLM/Chameleon z-loss on the LM logits (1e-5 when used)
    t_sampling: str = "uniform"  # training noise times: "uniform" or "logit_normal"
    t_mean: float = 0.0  # logit_normal: location m
    t_std: float = 1.0  # logit_normal: scale s > 0

    def __post_init__(self) -> None:
        check_choice("t_sampling", self.t_sampling, T_SAMPLING, error=ConfigError)
        check_number("t_mean", self.t_mean, error=ConfigError)
        _at_least(self, 0, "t_std", integer=False, low_open=True)
        _at_least(self, 0, "loss_weight", "z_loss", integer=False)
        check_number("max_t_when_conditioning", self.max_t_when_conditioning, low=0, high=1, error=ConfigError)
        if self.objective not in ("eps", "v", "flow"):
            raise ConfigError(f"diffusion objective must be 'eps', 'v' or 'flow', got {self.objective!r}")


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """The config of a `config.json` dict; a missing section or field takes its default.

        Raises:
            ConfigError: an unknown key, a value of the wrong type or out of range, named by its dotted
                path (e.g. "backbone.num_hidden_layers = 4.0 (float): must be an integer").
        """
        return build(cls, d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """The config in the JSON file `path`; raises ModelFileError naming the file and the field."""
        from mmgen.files import read_json_object  # here, not at the top: importing mmgen.config needs no torch

        try:
            return cls.from_dict(read_json_object(path))
        except ConfigError as e:
            raise ModelFileError(f"{path}: {e}") from None


def tiny(image: ImageConfig | None = None) -> ModelConfig:
    """~2.0M parameters (4 layers, width 192, 512-piece vocabulary): trains on the bundled 8×8 digits in
    minutes on a laptop CPU."""
    return ModelConfig(
        backbone=BackboneConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        image=image or ImageConfig(),
    )


def small(image: ImageConfig | None = None) -> ModelConfig:
    """~24M parameters (8 layers, width 512, GQA 8/4) with a 512-piece vocabulary; ~40M with 32,000."""
    return ModelConfig(
        backbone=BackboneConfig(
            hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=1024,
        ),
        image=image or ImageConfig(),
    )


def base(image: ImageConfig | None = None) -> ModelConfig:
    """~101M parameters (12 layers, width 768, GQA 12/4, 32,000-piece vocabulary): a GPU preset."""
    return ModelConfig(
        backbone=BackboneConfig(
            hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32_000,
        ),
        image=image or ImageConfig(),
    )


PRESETS = {"tiny": tiny, "small": small, "base": base}
