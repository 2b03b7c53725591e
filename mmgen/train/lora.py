"""LoRA adapters on the text path through `peft` (`--model.lora.rank=R`), and their merge for saving.

Each targeted projection of a text layer (`model.layers.{i}.self_attn.q_proj`, ..., `mlp.down_proj`;
never an image expert's) becomes peft's `lora.Linear`: its weight W stays frozen and the layer computes
W·x + (alpha / rank)·B·A·x with A (rank × in, Kaiming) and B (out × rank, zeros) trained, so training
starts from the pretrained model exactly. Checkpoints keep A and B (peft's names: `q_proj.base_layer.weight`,
`q_proj.lora_A.default.weight`), so a resume is exact; `merge_adapters` folds them into W (W + scale·B·A)
and puts plain `nn.Linear` modules back, so a saved model directory is a plain mmgen model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mmgen.errors import ConfigError
from mmgen.train.overrides import opt

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSection:
    rank: int = opt(0, "LoRA rank of the adapters on the text path (0: off); the text weights stay frozen and "
                       "the adapters are merged into them when the model is saved; needs model.init_from")
    alpha: float = opt(16.0, "LoRA scale numerator: a projection adds (alpha / rank)·B·A·x")
    dropout: float = opt(0.0, "dropout on the adapters' input (training only)")
    targets: list[str] = opt(list(TARGETS), f"text projections that get adapters, of {' '.join(TARGETS)}")

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora: rank = {self.rank}, alpha = {self.alpha}, dropout = {self.dropout}: "
                              "rank must be >= 0 (0: off), alpha > 0 and dropout in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"model.lora.targets = {self.targets}: give one or more of {', '.join(TARGETS)}")


def _peft():
    """The peft module, or a ConfigError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora.rank needs the peft package, which is not installed: pip install 'peft>=0.13'"
                          ) from None
    return peft


def add_adapters(backbone: nn.Module, section: LoraSection) -> None:
    """Put LoRA adapters on `section.targets` of every text layer of `backbone` (an `mmgen.backbone.LlamaModel`),
    in place. peft leaves only the adapters of `backbone` trainable (image experts are set trainable again
    by the caller)."""
    peft = _peft()
    pattern = rf"layers\.\d+\.(self_attn|mlp)\.({'|'.join(section.targets)})"  # full match: no image_expert.*
    config = peft.LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                             target_modules=pattern, bias="none")
    peft.inject_adapter_in_model(config, backbone)


def merge_adapters(backbone: nn.Module) -> None:
    """Fold every LoRA adapter of `backbone` into its frozen weight and put the plain module back, in place."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in backbone.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge()  # W <- W + (alpha / rank)·B·A
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent), child, module.get_base_layer())


def has_adapters(backbone: nn.Module) -> bool:
    """Whether `backbone` holds LoRA adapters (peft's `lora_A` / `lora_B` parameters)."""
    return any(".lora_A." in name for name, _ in backbone.named_parameters())
