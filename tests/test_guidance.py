"""Guidance conventions: APG reduces to CFG, thresholding is a no-op in range, the interval skips calls."""

import pytest
import torch

from mmgen.diffusion.guidance import Guidance, imagen_threshold, mimic_threshold
from mmgen.diffusion.samplers import sample_euler
from mmgen.diffusion.schedules import karras


def pair(seed=0, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_cfg_formula():
    c, u = pair()
    torch.testing.assert_close(Guidance(scale=4.0).combine(c, u), u + 4.0 * (c - u), atol=1e-5, rtol=1e-5)
    assert torch.equal(Guidance(scale=1.0).combine(c, u), c)


def test_apg_with_eta_one_no_cap_no_momentum_is_cfg_exactly():
    c, u = pair()
    apg = Guidance(scale=5.0, kind="apg", eta=1.0, norm_threshold=0.0, momentum=0.0).combine(c, u)
    cfg = Guidance(scale=5.0).combine(c, u)
    assert torch.equal(apg, cfg)


def test_apg_eta_zero_removes_the_parallel_part():
    c, u = pair()
    out = Guidance(scale=3.0, kind="apg", eta=0.0).combine(c, u)
    update = (out - c) / 2.0
    cos = (update * c).flatten(1).sum(1)
    assert cos.abs().max() < 1e-3  # orthogonal to D_c
    eta_half = Guidance(scale=3.0, kind="apg", eta=0.5).combine(c, u)
    assert not torch.allclose(eta_half, out)


def test_apg_norm_cap_and_momentum():
    c, u = pair()
    capped = Guidance(scale=3.0, kind="apg", norm_threshold=1.0).combine(c, u)
    norm = ((capped - c) / 2.0).flatten(1).norm(dim=1)
    assert (norm <= 1.0 + 1e-5).all()
    g, state = Guidance(scale=3.0, kind="apg", momentum=-0.5), {}
    first = g.combine(c, u, state)
    second = g.combine(c, u, state)  # the buffer now holds Δ: second update is Δ − 0.5·Δ
    torch.testing.assert_close(second - c, 0.5 * (first - c))


def test_dynamic_thresholding_leaves_in_range_predictions_alone():
    x = torch.rand(3, 1, 8, 8) * 1.8 - 0.9
    assert torch.equal(imagen_threshold(x), x)
    c, u = pair()
    same = Guidance(scale=2.0).combine(c, u)
    torch.testing.assert_close(mimic_threshold(same, same), same)  # real scale == reference scale


def test_dynamic_thresholding_tames_out_of_range_predictions():
    x = torch.randn(3, 1, 8, 8) * 5
    y = imagen_threshold(x)
    assert y.abs().max() <= 1.0 + 1e-6
    c, u = pair()
    big = Guidance(scale=15.0, threshold="mimic", mimic_scale=3.0).combine(c, u)
    ref, real = u + 3.0 * (c - u), u + 15.0 * (c - u)
    centered = lambda x, around: (x - around.flatten(2).mean(-1)[..., None, None]).abs().flatten(2).amax(-1)  # noqa: E731
    ref_range, big_range = centered(ref, ref), centered(big, real)
    torch.testing.assert_close(big_range, ref_range, atol=1e-5, rtol=1e-5)


def test_cfg_rescale_matches_the_conditional_std():
    c, u = pair()
    out = Guidance(scale=7.0, rescale=1.0).combine(c, u)
    torch.testing.assert_close(out.flatten(1).std(1), c.flatten(1).std(1), atol=1e-5, rtol=1e-5)


def test_guidance_interval_skips_unconditional_calls():
    calls = {"cond": 0, "uncond": 0}

    def branches(x, sigma, with_uncond):
        calls["cond"] += 1
        calls["uncond"] += int(with_uncond)
        return x * 0.5, (x * 0.1 if with_uncond else None)

    sigmas = karras(20, 0.01, 80.0)
    inside = int(((sigmas[:-1] >= 0.3) & (sigmas[:-1] <= 5.0)).sum())
    g = Guidance(scale=3.0, interval=(0.3, 5.0))
    sample_euler(g.denoiser(branches), torch.randn(2, 4) * 80, sigmas)
    assert calls == {"cond": 20, "uncond": inside} and 0 < inside < 20
    calls.update(cond=0, uncond=0)
    sample_euler(Guidance(scale=1.0).denoiser(branches), torch.randn(2, 4) * 80, sigmas)
    assert calls["uncond"] == 0


def test_bad_guidance():
    with pytest.raises(ValueError, match="kind"):
        Guidance(kind="pag")
    with pytest.raises(ValueError, match="threshold"):
        Guidance(threshold="static")
