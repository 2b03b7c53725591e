import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from mmgen.config import BackboneConfig, ImageConfig, ModelConfig  # noqa: E402
from mmgen.data.digits import DigitsDataset  # noqa: E402
from mmgen.model import MMGenModel  # noqa: E402
from mmgen.sequence import SequenceBuilder  # noqa: E402
from mmgen.tokenizers.text import TextTokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer() -> TextTokenizer:
    digits = DigitsDataset("all")
    return TextTokenizer.train([digits[i][1] for i in range(len(digits))], vocab_size=512)  # every caption


def micro_config(vocab_size: int, objective: str = "eps", **backbone) -> ModelConfig:
    bb = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    cfg = ModelConfig(backbone=BackboneConfig(**{**bb, **backbone}), image=ImageConfig())
    cfg.diffusion.objective = objective
    return cfg


@pytest.fixture
def model(tokenizer) -> MMGenModel:
    torch.manual_seed(0)
    m = MMGenModel(micro_config(len(tokenizer), objective="flow"))
    with torch.no_grad():  # an untrained model predicts zeros for images; make its outputs depend on inputs,
        m.image.proj_out.weight.normal_(0, 0.02)  # small enough that sampled images are not clamped flat
    return m.eval()


@pytest.fixture
def builder(model, tokenizer) -> SequenceBuilder:
    c = model.config
    return SequenceBuilder(tokenizer, 1, 8, c.image.tokens_per_image, c.backbone.max_position_embeddings)


def digit(i: int = 0) -> torch.Tensor:
    return DigitsDataset("test").images[i]


class ScriptedFeed:
    """An engine `Feed` (mmgen.generation) on a script: `join` joins at the `join_at`-th decode step,
    row `cancel` is cancelled from the `cancel_at`-th on."""

    def __init__(self, join, join_at: int = 2, cancel: int = 1, cancel_at: int = 3):
        self.join, self.join_at, self.cancel, self.cancel_at, self.steps = join, join_at, cancel, cancel_at, 0

    def cancelled(self) -> list[int]:
        return [self.cancel] if self.steps == self.cancel_at else []

    def joins(self, running: int) -> list:
        self.steps += 1
        return [self.join] if self.steps == self.join_at else []
