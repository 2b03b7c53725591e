"""Training noise times (`DiffusionConfig.t_sampling`): uniform exactly as before, logit-normal (SD3) with the
right law, the cap on conditioning images, determinism through the generator, and clear config errors."""

import math

import pytest
import torch
from conftest import digit, micro_config
from test_interfaces import make

from mmgen.config import DiffusionConfig, ModelConfig
from mmgen.diffusion.objective import draw_times
from mmgen.errors import ConfigError
from mmgen.heads.timestep import timestep_features
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBuilder


def old_train_inputs(self, tokens, conditions, generator):
    """`DiffusionInterface.train_inputs` as it was before t_sampling: the reference of the default."""
    x0 = tokens.latents.to(self.proj_in.weight.dtype)
    t = torch.rand(len(x0), generator=generator, device=x0.device)
    t = torch.where(conditions, t * self.diffusion.max_t_when_conditioning, t)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t, target = self.objective.add_noise(x0, t, noise)
    time = self.time_mlp(timestep_features(t, self.time_features))  # (N, D)
    return self.proj_in(self.patchify(x_t)) + time[:, None, :], self.patchify(target)


def model_with(tokenizer, **diffusion) -> MMGenModel:
    cfg = micro_config(len(tokenizer), objective="flow")
    for k, v in diffusion.items():
        setattr(cfg.diffusion, k, v)
    torch.manual_seed(0)
    return MMGenModel(ModelConfig.from_dict(cfg.to_dict()))


def recorded_times(model, images, conditions, seed=0) -> torch.Tensor:
    """The t (N,) that `train_inputs` draws, read from the objective's add_noise."""
    seen = []
    add_noise = model.image.objective.add_noise
    model.image.objective.add_noise = lambda x0, t, noise: (seen.append(t), add_noise(x0, t, noise))[1]
    model.image.train_inputs(model.encode_images(images), conditions, torch.Generator().manual_seed(seed))
    del model.image.objective.add_noise
    return seen[0]


def test_uniform_default_draws_exactly_what_torch_rand_draws(tokenizer):
    assert DiffusionConfig().t_sampling == "uniform"
    assert torch.equal(draw_times(7, torch.Generator().manual_seed(3), torch.device("cpu")),
                       torch.rand(7, generator=torch.Generator().manual_seed(3)))
    model = model_with(tokenizer)
    images, conditions = torch.stack([digit(i) for i in range(4)]), torch.tensor([False, True, False, True])
    tokens = model.encode_images(images)
    new = model.image.train_inputs(tokens, conditions, torch.Generator().manual_seed(5))
    old = old_train_inputs(model.image, tokens, conditions, torch.Generator().manual_seed(5))
    (inputs, (target, _)), (old_inputs, old_target) = new, old
    assert torch.equal(inputs, old_inputs) and torch.equal(target, old_target)


def test_logit_normal_has_the_law_of_sigmoid_of_a_normal():
    m, s, n = 0.4, 0.8, 200_000
    t = draw_times(n, torch.Generator().manual_seed(0), torch.device("cpu"), "logit_normal", m, s).double()
    assert t.min() > 0 and t.max() < 1
    ranked = t.sort().values
    cdf = 0.5 * (1 + torch.erf((torch.logit(ranked) - m) / (s * math.sqrt(2))))  # P(T <= t) = Φ((logit t − m)/s)
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)  # the 1% critical value of the Kolmogorov–Smirnov statistic
    for q, z in [(0.1, -1.2815516), (0.5, 0.0), (0.9, 1.2815516)]:
        assert torch.quantile(t[:100_000], q).item() == pytest.approx(1 / (1 + math.exp(-(m + s * z))), abs=5e-3)
    middle = draw_times(n, torch.Generator().manual_seed(1), torch.device("cpu"), "logit_normal")
    assert middle.mean().item() == pytest.approx(0.5, abs=3e-3)  # mean 0: mass in the middle (t = 1 is noise)
    assert ((middle > 0.25) & (middle < 0.75)).float().mean() > 0.6  # uniform would give 0.5


def test_conditioning_images_keep_their_noise_cap(tokenizer):
    model = model_with(tokenizer, t_sampling="logit_normal", t_mean=1.5, max_t_when_conditioning=0.3)
    images = torch.stack([digit(i) for i in range(64)])
    conditions = torch.arange(64) % 2 == 0
    capped = recorded_times(model, images, conditions)
    free = recorded_times(model, images, torch.zeros(64, dtype=torch.bool))
    torch.testing.assert_close(capped[conditions], 0.3 * free[conditions], rtol=0, atol=0)
    assert torch.equal(capped[~conditions], free[~conditions])
    assert capped[conditions].max() <= 0.3 and free.mean() > 0.7  # t_mean 1.5 leans to noise (t = 1)


def test_same_generator_state_gives_the_same_times_and_inputs(tokenizer):
    model = model_with(tokenizer, t_sampling="logit_normal")
    g = torch.Generator().manual_seed(9)
    draw_times(3, g, torch.device("cpu"), "logit_normal")
    state = g.get_state()  # a checkpoint taken mid-run
    a = draw_times(5, g, torch.device("cpu"), "logit_normal")
    g.set_state(state)
    assert torch.equal(draw_times(5, g, torch.device("cpu"), "logit_normal"), a)
    images, conditions = torch.stack([digit(i) for i in range(3)]), torch.tensor([True, False, False])
    assert torch.equal(recorded_times(model, images, conditions, 4), recorded_times(model, images, conditions, 4))
    batch = SequenceBuilder(tokenizer, 1, 8, 16, 96)([["a digit", digit(0)], [digit(1), "seven"]])
    first, second = (model.train().loss(batch, torch.Generator().manual_seed(2))["loss"] for _ in range(2))
    assert torch.equal(first, second) and torch.isfinite(first)


def test_config_errors_name_the_field_and_the_choices(tokenizer):
    with pytest.raises(ConfigError, match="t_sampling = 'lognormal'.*'uniform', 'logit_normal'"):
        DiffusionConfig(t_sampling="lognormal")
    for std in (0.0, -1.0):
        with pytest.raises(ConfigError, match=r"t_std = .*\(0, inf\]"):
            DiffusionConfig(t_sampling="logit_normal", t_std=std)
    with pytest.raises(ConfigError, match="diffusion.t_mean"):
        ModelConfig.from_dict({"diffusion": {"t_mean": "high"}})
    old = ModelConfig().to_dict()
    for key in ("t_sampling", "t_mean", "t_std"):
        del old["diffusion"][key]  # a config.json written before the field existed
    assert ModelConfig.from_dict(old).diffusion == DiffusionConfig()
    with pytest.raises(ConfigError, match="t_sampling = 'logit_normal' applies to the 'diffusion' interface"):
        cfg = make("mar", len(tokenizer)).config
        cfg.diffusion.t_sampling = "logit_normal"
        MMGenModel(cfg)
