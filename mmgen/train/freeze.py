"""Training a pretrained LLM without changing its text: `--model.freeze=text` (LMFusion) and LoRA, and the
merge that makes the trained model a plain mmgen model again.

`adapt(model, section)` runs after the weights are in (`load_hf_llama`), before the optimizer is built:
  - every weight of the backbone and the LM head is frozen (requires_grad False: no gradient, no optimizer
    state, no weight decay, no EMA);
  - freeze=text: each layer's image expert trains (a copy of the layer's text weights at the start; image
    slots run through it, attention stays joint: `mmgen.backbone.Routing`), so text-only inputs keep the
    checkpoint's logits after any amount of training;
  - lora.rank > 0: LoRA adapters on the text projections train (`mmgen.train.lora`);
  - the rows mmgen appended to the vocabulary (`<boi>`, `<eoi>`, role markers, ...) train as a small
    parameter of their own in the embedding and in the LM head (`SplitEmbedding`, `SplitHead`): the model
    learns to open an image while the checkpoint's rows stay bit-identical;
  - the image interface trains as usual; the image tokenizer (and a vision encoder) stays frozen.
`merge_for_saving(model, ema)` takes the EMA weights, writes the appended rows back into the embedding and
the LM head, merges LoRA, and puts plain modules back (parameter names as `from_pretrained` expects).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.checkpoint import read_hf_config
from mmgen.errors import ConfigError
from mmgen.train.lora import add_adapters, has_adapters, merge_adapters

if TYPE_CHECKING:
    from mmgen.model import MMGenModel
    from mmgen.train.config import ModelSection
    from mmgen.train.optim import EMA


class SplitEmbedding(nn.Module):
    """An embedding whose ids below `base` read the frozen `weight` (V, D) and the others `appended` (V − base, D)."""

    def __init__(self, embedding: nn.Embedding, base: int):
        super().__init__()
        self.base = base
        self.weight = embedding.weight  # keeps its name, model.embed_tokens.weight
        self.appended = nn.Parameter(embedding.weight[base:].detach().clone())  # (V − base, D)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, T) -> embeddings (B, T, D)."""
        rows = self.appended[(ids - self.base).clamp(min=0)]  # (B, T, D)
        return torch.where((ids >= self.base)[..., None], rows, F.embedding(ids, self.weight))


class SplitHead(nn.Module):
    """An LM head whose first `base` logits come from the frozen `weight` (V, D), the others from `appended`
    (V − base, D) (the embedding's own parameter when the two are tied)."""

    def __init__(self, head: nn.Linear, base: int, appended: nn.Parameter | None = None):
        super().__init__()
        self.base = base
        self.weight = head.weight  # keeps its name, lm_head.weight
        self.appended = appended if appended is not None else nn.Parameter(head.weight[base:].detach().clone())

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> logits (..., V)."""
        return torch.cat([F.linear(hidden, self.weight[: self.base]), F.linear(hidden, self.appended)], -1)


def adapt(model: MMGenModel, section: ModelSection, sharded: bool = False) -> None:
    """Freeze the text weights of `model` (loaded from `section.init_from`) and make its adapters trainable, in
    place, as `section.freeze` and `section.lora` say; nothing happens when neither is set.

    Raises:
        ConfigError: under FSDP (`sharded`), whose gathered state would hold the adapters' names.
    """
    if section.freeze == "none" and not section.lora.rank:
        return
    if sharded:
        raise ConfigError("model.freeze and model.lora are not supported under FSDP (the saved weights would keep the "
                          "adapters apart); train with DDP (the default of `accelerate launch`)")
    base = read_hf_config(section.init_from).vocab_size  # the checkpoint's rows; mmgen's come after them
    model.model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    if section.lora.rank:
        add_adapters(model.model, section.lora)
    if section.freeze == "text":
        for layer in model.model.layers:
            layer.image_expert.requires_grad_(True)
    embedding = SplitEmbedding(model.model.embed_tokens, base)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.lm_head = SplitHead(model.lm_head, base, embedding.appended if tied else None)
    model.model.embed_tokens = embedding


@torch.no_grad()
def merge_for_saving(model: MMGenModel, ema: EMA | None) -> EMA | None:
    """Make an adapted `model` a plain mmgen model, in place: the EMA weights (if any) copied in, the appended
    rows written into the embedding and the LM head, LoRA merged. Returns the EMA to use from now on: None
    once it is spent (its names are gone), `ema` itself for a model that was never adapted."""
    embedding, head = model.model.embed_tokens, model.lm_head
    if not isinstance(embedding, SplitEmbedding):
        return ema
    if ema is not None:
        ema.copy_to(model)
    if has_adapters(model.model):
        merge_adapters(model.model)
    for split in (embedding, head):
        split.weight[split.base :] = split.appended
    model.model.embed_tokens = nn.Embedding(*embedding.weight.shape, device="meta")  # no storage: weight set next
    model.model.embed_tokens.weight = embedding.weight
    model.lm_head = nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False, device="meta")
    model.lm_head.weight = head.weight  # the embedding's own when tied
    return None
