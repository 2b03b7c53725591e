"""Transfusion: continuous latents denoised inside the backbone, bidirectional within each image.

Latents (N, c, G, G) are cut into p×p patches (N, L, P); a linear layer maps each patch to the
hidden width and a timestep embedding is added per image; a zero-initialized linear layer maps
the hidden states at the slots back to patch space (ε, v or flow velocity, per `objective`).
With `image.patch_encoder = "unet"`, timestep-conditioned U-Net down / up blocks replace the two linear
layers (`mmgen.heads.unet`; Transfusion §4.3).
Noise time is drawn per image (uniform or logit-normal, `diffusion.t_sampling`) and capped for an image
that precedes its text (DESIGN §4).
Drawing runs a sampler of `mmgen.diffusion.samplers` over the image slots only, on the prefix's
cached keys and values (read, never written), the null-prompt branch in the same batch for guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmgen import capture
from mmgen.config import ImageConfig, ModelConfig
from mmgen.diffusion.guidance import Guidance
from mmgen.diffusion.noise import BrownianTreeNoise, iid_noise
from mmgen.diffusion.objective import Objective, draw_times
from mmgen.diffusion.samplers import SAMPLERS, STOCHASTIC
from mmgen.diffusion.schedules import make_sigmas, resolution_shift
from mmgen.diffusion.step_cache import FirstBlockCache
from mmgen.errors import OptionError
from mmgen.events import ImageStep, relay
from mmgen.heads.timestep import timestep_features
from mmgen.heads.unet import UNetPatches
from mmgen.interfaces.base import Drawing, DrawRequest, ImageInterface, require_tokenizer
from mmgen.interfaces.understanding import check_understanding
from mmgen.kv_cache import KVCache, pad_and_stack
from mmgen.sampling import GenerationOptions
from mmgen.tokenizers.image import ImageTokens

DEFAULT_STEPS = 25


@dataclass
class DiffusionOptions:
    """Image sampling in the backbone (see `GenerationOptions` for each field)."""

    image_steps: int | None = None  # None: DEFAULT_STEPS
    sampler: str = "euler"
    schedule: str | Sequence[float] = "uniform"
    shift: float | str = 1.0
    eta: float | None = None
    noise: str = "brownian"
    guidance: Guidance = field(default_factory=Guidance)
    cache_threshold: float = 0.0


class DiffusionInterface(ImageInterface):
    name = "diffusion"
    causal = False
    Options = DiffusionOptions

    def __init__(self, config: ModelConfig, time_features: int = 256):
        super().__init__(config)
        self.diffusion = config.diffusion
        self.objective = Objective(config.diffusion.objective)
        self.time_features = time_features
        d, p, linear = self.hidden_size, self.cfg.patch_dim, self.cfg.patch_encoder == "linear"
        if linear:  # built in this order (in, time, out): the random initialization of a seed stays as it was
            self.proj_in = nn.Linear(p, d)
        else:
            self.unet = UNetPatches(self.cfg.tokenizer.latent_channels, self.cfg.patch_size, d, self.cfg.unet_channels,
                                    self.cfg.unet_skips)
        self.time_mlp = nn.Sequential(nn.Linear(time_features, d), nn.SiLU(), nn.Linear(d, d))
        if linear:
            self.proj_out = nn.Linear(d, p)

    @classmethod
    def check_config(cls, image: ImageConfig) -> None:
        require_tokenizer(cls.name, image, discrete=False)
        check_understanding(cls.name, cls.causal, image)

    def options(self, options: GenerationOptions) -> DiffusionOptions:
        o = super().options(options)
        if o.sampler not in STOCHASTIC and (o.eta is not None or o.noise != "brownian"):
            raise OptionError(f"eta and noise apply to the stochastic samplers ({', '.join(sorted(STOCHASTIC))}); "
                             f"{o.sampler!r} is deterministic: drop them or choose one of those")
        return o

    def init_weights(self) -> None:
        if self.cfg.patch_encoder == "unet":
            self.unet.init_weights()
        else:
            nn.init.zeros_(self.proj_out.weight)  # start by predicting zeros (DiT-style)
            nn.init.zeros_(self.proj_out.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_mlp[0].weight.dtype

    def embed_patches(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Any]:
        """Latents (N, c, G, G) at noise time t (N,) -> token embeddings (N, L, D), and what `predict` needs
        from this step besides the hidden states (the time embedding and the U-Net's skips)."""
        time = self.time_mlp(timestep_features(t, self.time_features).to(x_t.dtype))  # (N, D)
        if self.cfg.patch_encoder == "unet":
            tokens, skips = self.unet.encode(x_t, time)
            return tokens + time[:, None, :], (time, skips)
        return self.proj_in(self.patchify(x_t)) + time[:, None, :], None

    def predict(self, hidden: Tensor, state: Any) -> Tensor:
        """Hidden states at image slots (N, L, D), and `embed_patches`' state -> model output per patch (N, L, P)."""
        if self.cfg.patch_encoder == "unet":
            return self.patchify(self.unet.decode(hidden, *state))
        return self.proj_out(hidden)

    def embed(self, tokens: ImageTokens) -> Tensor:
        latents = tokens.latents.to(self.dtype)
        return self.embed_patches(latents, latents.new_zeros(len(latents)))[0]

    def train_inputs(self, tokens: ImageTokens, conditions: Tensor, generator: torch.Generator | None):
        """Inputs (N, L, D); targets: the patched target (N, L, P) and `predict`'s state."""
        x0 = tokens.latents.to(self.dtype)
        n = len(x0)
        d = self.diffusion
        t = draw_times(n, generator, x0.device, d.t_sampling, d.t_mean, d.t_std)  # (N,)
        t = torch.where(conditions, t * self.diffusion.max_t_when_conditioning, t)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t, target = self.objective.add_noise(x0, t, noise)
        inputs, state = self.embed_patches(x_t, t)
        return inputs, (self.patchify(target), state)

    def loss(self, targets: tuple[Tensor, Any], slots: Tensor, prev: Tensor, generator=None) -> Tensor:
        target, state = targets
        err = (self.predict(slots, state).float() - target.float()).pow(2).mean((1, 2))  # (N,)
        return self.diffusion.loss_weight * err

    # -- drawing ---------------------------------------------------------------------------------

    def denoiser(self, model, cache: KVCache, guidance: Guidance, null: KVCache | None = None,
                 step_cache: FirstBlockCache | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """D(x, σ) -> x0 for the R rows of `cache` (each ending in <boi>); the cache's filled slots are read,
        never written (each step writes its image at the same slots past them, uncommitted).

        Guided steps run the null prompt's cache `null` (1 row, needed when guidance is on) beside
        every row in one batch; unguided ones (scale 1, or σ outside the guidance interval) run the
        rows alone. Each batch's attention context is built once and every step reuses it, so a step
        reads no device value and has static shapes (captured on CUDA, `mmgen.capture`); `step_cache`
        replaces the backbone call by First Block Cache.
        """
        r, L, obj = cache.next_position.shape[0], self.cfg.tokens_per_image, self.objective
        kv = {False: cache, True: pad_and_stack([cache] + [null] * r) if null is not None else None}
        contexts = {}

        def context(with_uncond: bool):
            if with_uncond not in contexts:
                c = kv[with_uncond]
                rows, dev = c.next_position.shape[0], c.next_position.device
                positions = model.chunk_positions(c.next_position, L, image=True)  # (rows, L) or (rows, L, 3)
                doc = torch.zeros(rows, L, dtype=torch.long, device=dev)
                contexts[with_uncond] = model.context(positions, doc, torch.full_like(doc, c.images), c)
            return contexts[with_uncond]

        def branches(x: Tensor, sigma: Tensor, with_uncond: bool) -> tuple[Tensor, Tensor | None]:
            ctx = context(with_uncond)
            t = obj.t_from_sigma(sigma.double()).float().expand(len(ctx.cos))
            a, _ = obj.alpha_sigma(t)
            x_t = (torch.cat([x, x]) if with_uncond else x) * a.view(-1, 1, 1, 1).to(x.dtype)
            tokens, state = self.embed_patches(x_t.to(model.dtype), t)  # (rows, L, D)
            if step_cache is not None:
                hidden = step_cache(model.model, tokens, ctx)
            else:
                hidden = capture.run(model.model, tokens, ctx, repeats=True)
            x0 = obj.to_x0(x_t, self.unpatchify(self.predict(hidden, state)).to(x.dtype), t)
            return (x0[:r], x0[r:]) if with_uncond else (x0, None)

        return torch.no_grad()(guidance.denoiser(branches))

    @torch.no_grad()
    def draw(self, request: DrawRequest) -> Drawing:
        """Sample latents (R, c, G, G), then commit them as a prompt image would be: decoded to pixels
        and encoded again by the image tokenizer."""
        o, m, rows = request.options, request.model, request.rows
        shift = resolution_shift(self.cfg.tokens_per_image) if o.shift == "auto" else float(o.shift)
        sigmas = make_sigmas(self.objective, o.image_steps or DEFAULT_STEPS, o.schedule, shift).to(m.device)
        tc = self.cfg.tokenizer
        shape = (tc.latent_channels, tc.grid, tc.grid)
        x = torch.stack([torch.randn(shape, generator=g, device=m.device) for g in request.generators])
        x = x * sigmas[0].float()
        kwargs = {}
        if o.sampler in STOCHASTIC:
            if o.noise == "brownian":  # one path per row, seed and image index: batch-independent
                kwargs["noise"] = BrownianTreeNoise(x, float(sigmas[-2]), float(sigmas[0]), request.noise_seeds)
            else:
                kwargs["noise"] = iid_noise(x, request.generators)
            if o.eta is not None:
                kwargs["eta"] = o.eta
        request.step_cache = FirstBlockCache(o.cache_threshold) if o.cache_threshold else None
        null = request.null_prefix()[0] if o.guidance.scale != 1 else None
        denoiser = self.denoiser(m, request.cache, o.guidance, null, request.step_cache)
        steps = SAMPLERS[o.sampler].steps(denoiser, x, sigmas, **kwargs)
        latents = yield from relay(steps, lambda info: ImageStep(list(range(rows)), info["i"] + 1, info["steps"],
                                                                 info["denoised"]))
        return m.encode_images(m.decode_images(ImageTokens(latents=latents)))
