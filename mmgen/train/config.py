"""The training configuration: one dataclass per section, from a YAML/JSON file plus overrides.

    out, seed, resume, overwrite
    model       preset (tiny / small / base) + overrides of `mmgen.config.ModelConfig` fields
    tokenizer   a trained SentencePiece model, or one trained here on the data's text
    image_tokenizer   the budget of an image tokenizer (model.image.tokenizer kind vae / vq / hybrid) trained
                here on the data's images before the model, when model.image_tokenizer names none
    data        sources (bundled, image folder, HF datasets on disk, text, interleaved) mixed by weight
    optim       AdamW, warmup + cosine decay, gradient clipping
    train       steps, global batch, accumulation, precision, EMA, the non-finite guard
    checkpoint / log / samples / eval
Named configs ship in `mmgen/train/configs/`; with no config, `mmgen train` runs `digits-tiny`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgen.config import PRESETS, BackboneConfig, DiffusionConfig, ImageConfig, ImageTokenizerConfig, ModelConfig
from mmgen.data.edits import SPLITS as EDIT_SPLITS
from mmgen.errors import ConfigError
from mmgen.train.help import MODEL_HELP
from mmgen.train.init_from import init_backbone
from mmgen.train.lora import LoraSection
from mmgen.train.overrides import build, convert, describe, load_file, opt, set_dotted, suggest, to_dict

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "digits-tiny"
SOURCE_KINDS = ("digits", "shapes", "dialogues", "edits", "image_folder", "hf", "text", "interleaved")


@dataclass
class SourceConfig:
    kind: str = opt("digits", f"one of {', '.join(SOURCE_KINDS)}")
    path: str | None = opt(None, "image_folder: folder; hf: dataset saved with save_to_disk; text: file or folder "
                                 "of .txt; interleaved: JSONL file")
    weight: float = opt(1.0, "relative share of this source in the mixture")
    split: str = opt("train", "digits, dialogues: the digits split, train / test / all; edits: train / held_out; "
                              "hf: the split of a DatasetDict")
    captions: str | None = opt(None, "image_folder: captions JSONL (default: PATH/captions.jsonl, else "
                                     "PATH/metadata.jsonl); lines {\"file_name\": ..., \"text\": ...}")
    image_column: str = opt("image", "hf: column with images (PIL images, bytes or paths); absent: text only")
    text_column: str = opt("text", "hf: column with the caption or text")
    text_unit: str = opt("paragraph", "text: one sample per line, paragraph (blank-line separated) or file")
    size: int = opt(10_000, "shapes: number of procedural images; dialogues, edits: conversations per epoch")
    max_objects: int = opt(3, "shapes: most objects per image (1..5)")
    p_image_first: float = opt(0.2, "image-caption sources: share of image -> caption samples")
    caption_dropout: float = opt(0.1, "image-caption sources: share of captions dropped (classifier-free guidance)")
    limit: int = opt(0, "use at most this many items (0: all)")
    loss_on: str = opt("all", "dialogues, edits: LM loss on every text token (all) or only on assistant turns "
                              "(assistant)")

    def __post_init__(self) -> None:
        chats = ("dialogues", "edits")
        if self.loss_on not in ("all", "assistant") or (self.loss_on == "assistant" and self.kind not in chats):
            raise ConfigError(f"loss_on = {self.loss_on!r}: 'all', or 'assistant' for a dialogues or edits source")
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"unknown source kind {self.kind!r}{suggest(self.kind, list(SOURCE_KINDS), what='kind')}")
        if self.kind == "edits" and self.split not in EDIT_SPLITS:
            raise ConfigError(f"split = {self.split!r}: an edits source takes {' or '.join(EDIT_SPLITS)}")
        if self.kind not in ("digits", "shapes", "dialogues", "edits") and not self.path:
            raise ConfigError(f"a {self.kind!r} source needs a path")
        if self.weight <= 0:
            raise ConfigError(f"source weight must be > 0, got {self.weight}")
        for name in ("p_image_first", "caption_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.text_unit not in ("line", "paragraph", "file"):
            raise ConfigError(f"text_unit must be line, paragraph or file, got {self.text_unit!r}")
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = opt([SourceConfig()], "data sources (a list of source sections)")
    packing: str = opt("pack", "pack: several samples per row, up to pack_length tokens, each attending only to "
                               "itself; pad: one sample per row, padded to the longest in the micro-batch")
    pack_length: int = opt(0, "row length when packing (0: the model's max_position_embeddings)")
    epoch_size: int = opt(0, "samples per epoch of the mixture (0: the sum of the sources' sizes)")
    num_workers: int = opt(0, "DataLoader worker processes (0: load in the training process)")
    max_skips: int = opt(100, "unreadable items in a row tolerated before the run stops with an error")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one source")
        if self.packing not in ("pack", "pad"):
            raise ConfigError(f"data.packing must be 'pack' or 'pad', got {self.packing!r}")
        if min(self.pack_length, self.epoch_size, self.num_workers) < 0 or self.max_skips < 1:
            raise ConfigError("data.pack_length, epoch_size and num_workers must be >= 0, max_skips >= 1")


@dataclass
class ModelSection:
    preset: str = opt("tiny", f"model size preset: {', '.join(PRESETS)}")
    image_tokenizer: str | None = opt(None, "directory of a trained image tokenizer (`mmgen train-tokenizer`); "
                                            "its config replaces model.image.tokenizer, whose channels and "
                                            "resolution, if given, it must match")
    init_from: str | None = opt(None, "local Hugging Face Llama / Qwen2 directory to start from: its backbone shape, "
                                      "weights and tokenizer (docs/pretrained.md)")
    freeze: str = opt("none", "none, or text: every pretrained weight frozen (text-only logits stay the checkpoint's); "
                              "image slots get their own trainable copy of each layer (LMFusion); needs init_from")
    lora: LoraSection = opt(LoraSection(), "LoRA adapters on the frozen text path (peft); needs init_from")
    backbone: dict = opt({}, "overrides of the preset's backbone fields", leaf=True)
    image: dict = opt({}, "overrides of the preset's image fields", leaf=True)
    diffusion: dict = opt({}, "overrides of the preset's diffusion fields", leaf=True)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown model preset {self.preset!r}"
                              f"{suggest(self.preset, list(PRESETS), what='preset')}")
        if self.freeze not in ("none", "text"):
            raise ConfigError(f"model.freeze = {self.freeze!r}: none, or text (keep the pretrained model's text "
                              "exactly)")
        if (self.freeze != "none" or self.lora.rank) and not self.init_from:
            raise ConfigError("model.freeze=text and model.lora.rank keep pretrained text weights frozen: set "
                              "model.init_from to the local Hugging Face checkpoint to start from")
        if self.freeze == "text":  # the architecture that freezing needs (the backbone's own field)
            if not convert(self.backbone.get("image_experts", True), bool, "model.backbone.image_experts"):
                raise ConfigError("model.backbone.image_experts = false with model.freeze=text: frozen text weights "
                                  "need image experts to train; remove model.backbone.image_experts")
            self.backbone = {**self.backbone, "image_experts": True}


@dataclass
class TokenizerSection:
    path: str | None = opt(None, "a directory holding tokenizer.model (from `mmgen train-text-tokenizer` or a "
                                 "trained model) or a .model file; null: train one here on the data's text")
    vocab_size: int = opt(512, "vocabulary size when training one here")
    model_type: str = opt("bpe", "bpe or unigram, when training one here")
    max_texts: int = opt(100_000, "texts drawn from the sources to train it")


@dataclass
class ImageTokenizerTraining:
    steps: int = opt(1000, "optimizer steps (the cosine schedule spans them)")
    batch_size: int = opt(32, "images per step")
    lr: float = opt(1e-3, "peak learning rate (AdamW; 100 warmup steps, cosine to a tenth)")
    max_minutes: float = opt(0.0, "wall-clock budget in minutes, the schedule following the clock (0: none; "
                                  "a budget makes the result depend on the machine's speed)")
    max_images: int = opt(10_000, "images drawn from the sources, held in memory as float32 (N·C·R²·4 bytes); "
                                  "5% of them, at most 256, are held out for the reported PSNR")

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.max_images) < 1 or self.lr <= 0 or self.max_minutes < 0:
            raise ConfigError("image_tokenizer.steps, batch_size and max_images must be >= 1, lr > 0, "
                              "max_minutes >= 0")


@dataclass
class OptimConfig:
    lr: float = opt(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.05, "final learning rate as a share of lr (cosine decay)")
    warmup_steps: int = opt(200, "linear warmup steps")
    weight_decay: float = opt(0.05, "AdamW weight decay of matrices (norms, biases, embeddings: none)")
    betas: tuple[float, float] = opt((0.9, 0.98), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)")


@dataclass
class LoopConfig:
    steps: int = opt(3000, "optimizer steps")
    batch_size: int = opt(64, "global batch: samples per optimizer step, over all processes and accumulation")
    grad_accum: int = opt(1, "micro-batches per optimizer step on each process")
    mixed_precision: str = opt("no", "no, bf16 or fp16 autocast")
    ema_decay: float = opt(0.999, "EMA of the weights; the exported model holds the EMA (0: off)")
    threads: int = opt(0, "torch threads per process (0: torch's default)")
    max_nonfinite: int = opt(50, "non-finite steps in a row (skipped and counted) before the run stops (0: never)")
    attention: str = opt("auto", "attention kernel: auto (FlexAttention block masks on CUDA, else dense), dense "
                                 "(a boolean mask, SDPA) or flex (CUDA only); docs/training_speed.md")
    compile: bool = opt(False, "torch.compile each decoder layer (the first steps are slow; checkpoints unchanged)")
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer in the backward pass (less memory)")

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.attention not in ("auto", "dense", "flex"):
            raise ConfigError(f"train.attention must be auto, dense or flex, got {self.attention!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.steps, batch_size and grad_accum must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class CheckpointConfig:
    every: int = opt(500, "write a resumable checkpoint every N steps (and always at the end; 0: only at the end)")
    keep: int = opt(3, "keep the newest K checkpoints")

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


@dataclass
class LogConfig:
    every: int = opt(100, "one summary line (and a CSV row) every N steps")
    progress: bool = opt(True, "progress bar on the main process")
    tensorboard: bool = opt(True, "also log to tensorboard (OUT/tensorboard) if it is installed")
    wandb: bool = opt(False, "also log to Weights & Biases (must be installed)")
    wandb_project: str = opt("mmgen", "wandb project")


@dataclass
class SampleConfig:
    every: int = opt(0, "draw a PNG grid from the prompts every N steps and at the end (0: never)")
    prompts: list[str] = opt([], "fixed prompts, one grid row each")
    per_prompt: int = opt(4, "images per prompt")
    image_steps: int = opt(0, "denoising steps (0: the interface's default: 25 in the backbone, the MLP head's own)")
    guidance: float = opt(3.0, "classifier-free guidance scale")

    seed: int = opt(0, "sampling seed (the same images each time for the same weights)")
    scale: int = opt(4, "nearest-neighbour upscaling of the PNG")

    def __post_init__(self) -> None:
        if self.every < 0 or self.image_steps < 0 or self.per_prompt < 1 or self.scale < 1:
            raise ConfigError("samples.every and image_steps must be >= 0, per_prompt and scale >= 1")


@dataclass
class EvalConfig:
    digits: int = opt(0, "after training: generate N images per digit (judged by a digits classifier, at the "
                         "model's image format) and caption the 297 held-out digits; writes OUT/eval.json and "
                         "OUT/digits_grid.png (0: off)")
    image_steps: int = opt(0, "denoising steps of the digits evaluation (0: the interface's default)")
    guidance: float = opt(3.0, "classifier-free guidance scale of the digits evaluation")

    def __post_init__(self) -> None:
        if self.digits < 0 or self.image_steps < 0:
            raise ConfigError("eval.digits and eval.image_steps must be >= 0")


@dataclass
class TrainConfig:
    out: str = opt("runs/train", "output directory: final model, logs, sample grids, checkpoints/")
    seed: int = opt(0, "seed of initialization, data order and noise")
    resume: str | None = opt(None, "'latest' (newest checkpoint in OUT/checkpoints) or a checkpoint directory")
    overwrite: bool = opt(False, "start afresh in an OUT that holds a run (deletes its checkpoints and model)")
    model: ModelSection = opt(ModelSection(), "model")
    tokenizer: TokenizerSection = opt(TokenizerSection(), "text tokenizer")
    image_tokenizer: ImageTokenizerTraining = opt(ImageTokenizerTraining(), "image tokenizer trained here first, "
                                                  "into OUT/image_tokenizer, when model.image.tokenizer.kind is "
                                                  "vae, vq or hybrid and model.image_tokenizer is not set")
    data: DataConfig = opt(DataConfig(), "data")
    optim: OptimConfig = opt(OptimConfig(), "optimizer and learning-rate schedule")
    train: LoopConfig = opt(LoopConfig(), "training loop")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "resumable checkpoints")
    log: LogConfig = opt(LogConfig(), "logging")
    samples: SampleConfig = opt(SampleConfig(), "sample grids")
    eval: EvalConfig = opt(EvalConfig(), "evaluation after training (bundled digits)")


# -- the model section -----------------------------------------------------------------------------


def resolve_model(section: ModelSection, load_weights: bool = False):
    """The model config: the preset, then the section's overrides; returns (ModelConfig, image tokenizer or None).

    IMAGE-TOKENIZER HOOK: the one place where a config that names a trained image tokenizer
    checkpoint (`model.image_tokenizer`) gets its config and, with `load_weights`, its weights.
    Derived defaults: `head_dim` follows the width and heads; `image.patch_size`, when the section
    does not set it, is 1 for codes (one code per token) and for latent grids narrower than two of
    the preset's patches (a 2×2 grid), else the preset's.
    """
    raw = to_dict(PRESETS[section.preset]())
    bb = raw["backbone"]
    if bb["head_dim"] == bb["hidden_size"] // bb["num_attention_heads"]:
        bb["head_dim"] = None  # derived: follows hidden_size / heads when those are overridden
    image = dict(section.image)
    tokenizer = None
    if section.image_tokenizer:
        tokenizer = _trained_image_tokenizer(section.image_tokenizer, image.pop("tokenizer", {}))
        raw["image"]["tokenizer"] = to_dict(tokenizer.config)
    merged = {part: _merge(raw[part], over, f"model.{part}.")
              for part, over in (("backbone", section.backbone), ("image", image), ("diffusion", section.diffusion))}
    tok = merged["image"]["tokenizer"] = convert(merged["image"]["tokenizer"], ImageTokenizerConfig,
                                                 "model.image.tokenizer")
    if "patch_size" not in section.image:
        preset_patch = raw["image"]["patch_size"]
        merged["image"]["patch_size"] = 1 if tok.discrete or tok.grid < 2 * preset_patch else preset_patch
    config = ModelConfig(  # with init_from, the backbone is the checkpoint's shape (mmgen.train.init_from)
        backbone=init_backbone(section.init_from, section.backbone) if section.init_from else
        build(BackboneConfig, merged["backbone"], "model.backbone."),
        image=build(ImageConfig, merged["image"], "model.image."),
        diffusion=build(DiffusionConfig, merged["diffusion"], "model.diffusion."),
    )
    from mmgen.interfaces.registry import check_image_config

    try:
        check_image_config(config.image)  # what the interface needs of the image section
    except ValueError as e:
        raise ConfigError(f"model.image: {e}") from None
    return config, (tokenizer if load_weights else None)


IMAGE_FORMAT = ("channels", "resolution")  # the image format: what a config's data are read at


def _trained_image_tokenizer(directory: str, stated: dict):
    """Load the image tokenizer in `directory`. It replaces `stated` (model.image.tokenizer: the one a run trains
    when none is named, or raw pixels), whose image format it must take (e.g. digits: 1×8²)."""
    from mmgen.tokenizers.image import load_image_tokenizer

    if not isinstance(stated, dict):
        raise ConfigError(f"model.image.tokenizer is a section: give a mapping of its keys, got {stated!r}")
    try:
        tokenizer = load_image_tokenizer(directory)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.image_tokenizer: {e}") from None
    c = tokenizer.config
    want = {k: convert(stated[k], int, f"model.image.tokenizer.{k}") for k in IMAGE_FORMAT if k in stated}
    if any(getattr(c, k) != v for k, v in want.items()):
        fmt = f"{want.get('channels', c.channels)}×{want.get('resolution', c.resolution)}²"
        raise ConfigError(f"model.image_tokenizer: {directory} takes {c.channels}×{c.resolution}² images, this "
                          f"config's images are {fmt} (model.image.tokenizer); train a tokenizer at that format "
                          "(`mmgen train-tokenizer --channels C --resolution R`) or set model.image.tokenizer.channels "
                          "and .resolution to the tokenizer's")
    return tokenizer


def _merge(base: dict, over: dict, where: str) -> dict:
    """`over` on top of `base`, recursively for sections; unknown keys pass through for `build` to reject."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out




def help_text() -> str:
    """Every config key with its type, default and meaning (model keys show the tiny preset's values)."""
    out, skip = [], False
    for line in describe(TrainConfig):
        if line.startswith(("  --model.backbone=", "  --model.image=", "  --model.diffusion=")):
            skip = True  # an override map: replaced by every field it can override, below
            if line.startswith("  --model.backbone="):
                out += describe(ModelConfig, "model.", PRESETS["tiny"](), MODEL_HELP)
            continue
        if skip and line.startswith("        "):
            continue
        skip = False
        out.append(line)
    return "\n".join(out)


# -- loading -------------------------------------------------------------------------------------


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str) -> Path:
    """A config file path, or the name of a config shipped with mmgen (`digits-tiny`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if (CONFIG_DIR / f"{name_or_path}.yaml").is_file():
        return CONFIG_DIR / f"{name_or_path}.yaml"
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a named config ({', '.join(named_configs())})")


def check_drawing_options(config: TrainConfig, model: ModelConfig) -> None:
    """Raise ConfigError now if the sample grids' or the evaluation's image options are ones the model's
    interface does not take (otherwise the run would stop at its first grid, or after training)."""
    from mmgen.interfaces.registry import interface_class
    from mmgen.sampling import GenerationOptions

    cls = interface_class(model.image)
    for name, section in (("samples", config.samples), ("eval", config.eval)):
        options = GenerationOptions(image_steps=section.image_steps or None, guidance=section.guidance)
        try:
            options.image_options(cls.Options, cls.name)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None


def load_config(name_or_path: str | None = None,
                overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> TrainConfig:
    """Defaults < the config file (None: the bundled default job) < `overrides` (dotted keys).

    The model section is resolved too, so a bad model key fails here, not after the data are indexed.

    Args:
        name_or_path: a YAML/JSON file or the name of a shipped config (`digits-tiny`).
        overrides: dotted key -> value, a mapping in code (`{"train.steps": 500, "model.image_tokenizer": DIR}`)
            or (key, raw string) pairs from the command line; values are type-checked like the file's.
    """
    path = config_path(name_or_path or DEFAULT_CONFIG)
    pairs = list(overrides.items() if isinstance(overrides, Mapping) else overrides)
    raw = _merge(to_dict(TrainConfig()), load_file(path), "")
    for key, value in pairs:
        set_dotted(raw, key, value)
    try:
        config = build(TrainConfig, raw)
        check_drawing_options(config, resolve_model(config.model)[0])
    except ConfigError as e:
        raise ConfigError(f"{e} (config {path}{' and overrides' if pairs else ''})") from None
    return config
