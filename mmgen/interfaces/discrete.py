"""Chameleon: VQ codes predicted as next tokens, in raster order, with causal attention.

Codes have their own embedding and output head (K rows each) beside the text vocabulary, so a
pretrained LLM keeps its vocabulary untouched. The code at slot i is predicted from the hidden
state at slot i − 1 (`<boi>` for the first). The grammar of an image holds by construction: the
engine samples only text outside images, this interface draws exactly L codes after <boi>, and the
engine then writes <eoi>.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.config import ImageConfig, ModelConfig
from mmgen.diffusion.guidance import Guidance
from mmgen.errors import OptionError
from mmgen.interfaces.base import DrawRequest, require_tokenizer
from mmgen.interfaces.causal import CausalInterface
from mmgen.interfaces.understanding import check_understanding
from mmgen.sampling import GenerationOptions, sample_token
from mmgen.tokenizers.image import ImageTokens


@dataclass
class CodeOptions:
    """Sampling of codes: CFG on logits (its scale), temperature and top-k."""

    guidance: Guidance = field(default_factory=Guidance)
    image_temperature: float = 1.0
    image_top_k: int = 0


class DiscreteInterface(CausalInterface):
    name = "discrete"
    Options = CodeOptions

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        k, d = self.cfg.tokenizer.codebook_size, self.hidden_size
        self.max_corruption = config.diffusion.max_t_when_conditioning
        self.input_noise = config.image.input_code_noise
        self.code_embed = nn.Embedding(k, d)
        self.code_head = nn.Linear(d, k, bias=False)

    @classmethod
    def check_config(cls, image: ImageConfig) -> None:
        require_tokenizer(cls.name, image, discrete=True)
        check_understanding(cls.name, cls.causal, image)
        if image.patch_size != 1:
            raise ValueError(f"the {cls.name!r} interface predicts one code per token: set image.patch_size=1")

    def options(self, options: GenerationOptions) -> CodeOptions:
        o = super().options(options)
        if o.guidance != Guidance(scale=o.guidance.scale):
            raise OptionError(f"the {self.name!r} interface guides code logits by classifier-free guidance with its "
                             "scale only; APG, rescale, thresholding and intervals act on denoised images: "
                             "give guidance as a number")
        return o

    def code_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., K)."""
        return self.code_head(hidden)

    def embed(self, tokens: ImageTokens) -> Tensor:
        return self.code_embed(tokens.codes.flatten(1))  # (N, L, D)

    def train_inputs(self, tokens: ImageTokens, conditions: Tensor, generator=None):
        """Code embeddings in which a random share of the input codes is replaced by random codes
        while the targets stay the true codes. For images that precede their text the share is
        uniform up to `max_t_when_conditioning`, the discrete counterpart of the capped noise on
        conditioning images: without it a small dataset's code sequences are memorized (on the
        digits, captions of held-out images fell to 31% against 99% on the training images). For the
        images the model draws it is uniform up to `image.input_code_noise` (0: clean teacher forcing; 0.2
        by default when images are read as latents or features)."""
        codes = tokens.codes.flatten(1)  # (N, L)
        n, l = codes.shape
        cond = conditions.to(codes.device)
        if self.training and (self.input_noise > 0 or cond.any()):
            top = torch.where(cond, self.max_corruption, self.input_noise)  # (N,)
            rate = torch.rand(n, generator=generator, device=codes.device) * top  # (N,)
            swap = torch.rand(n, l, generator=generator, device=codes.device) < rate[:, None]
            noise = torch.randint(0, self.cfg.tokenizer.codebook_size, (n, l), generator=generator, device=codes.device)
            codes = torch.where(swap, noise, codes)
        return self.code_embed(codes), tokens

    def loss(self, tokens: ImageTokens, slots: Tensor, prev: Tensor, generator=None) -> Tensor:
        logits = self.code_logits(prev).float()  # (N, L, K)
        ce = F.cross_entropy(logits.flatten(0, 1), tokens.codes.flatten(), reduction="none")
        return ce.view(len(logits), -1).mean(1)  # (N,)

    # -- drawing, one code at a time -------------------------------------------------------------

    def sample_codes(self, cond: Tensor, uncond: Tensor | None, request: DrawRequest) -> Tensor:
        """Codes (R,) from the predicting hidden states (R, D), CFG on logits when `uncond` is given."""
        o = request.options
        logits = self.code_logits(cond).float()  # (R, K)
        if uncond is not None:
            logits_u = self.code_logits(uncond).float()
            logits = logits_u + o.guidance.scale * (logits - logits_u)
        return sample_token(logits, request.generators, o.image_temperature, o.image_top_k)

    def sample_step(self, cond: Tensor, uncond: Tensor | None, request: DrawRequest) -> ImageTokens:
        return ImageTokens(codes=self.sample_codes(cond, uncond, request))

    def embed_step(self, step: ImageTokens) -> Tensor:
        return self.code_embed(step.codes)[:, None]  # (R, 1, D)

    def assemble(self, steps: list[ImageTokens]) -> ImageTokens:
        codes = torch.stack([s.codes for s in steps], 1)  # (R, L)
        return ImageTokens(codes=codes.view(len(codes), self.cfg.grid, self.cfg.grid))  # (R, g, g)
