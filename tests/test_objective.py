"""Schedules, targets and the VE bridge used by the samplers."""

import math

import pytest
import torch

from mmgen.diffusion.objective import MAX_SIGMA, Objective
from mmgen.diffusion.samplers import sample_euler
from mmgen.diffusion.schedules import uniform


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_perfect_prediction_recovers_x0(kind):
    obj = Objective(kind)
    x0, noise = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    x_t, target = obj.add_noise(x0, t, noise)
    torch.testing.assert_close(obj.to_x0(x_t, target, t), x0)


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_sigma_and_t_are_inverse(kind):
    obj = Objective(kind)
    t = torch.linspace(0.0, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(obj.t_from_sigma(obj.sigma(t)), t, atol=1e-7, rtol=0)
    a, s = obj.alpha_sigma(t)
    if kind != "flow":
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))  # variance preserving


def test_cosine_schedule_endpoints():
    a, s = Objective("eps").alpha_sigma(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert a[0] == 1 and s[0] == 0
    assert abs(a[1].item() ** 2 - math.cos((0.5 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2) < 1e-12
    assert s[2] / a[2] == pytest.approx(MAX_SIGMA, rel=1e-6)


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_sigmas_decrease_to_zero(kind):
    sig = uniform(Objective(kind), 10)
    assert len(sig) == 11 and sig[-1] == 0 and (sig[:-1] > sig[1:]).all()
    assert sig[0] == pytest.approx(MAX_SIGMA if kind == "flow" else 80.0)  # ε/v: no 1/a ≈ 1000 blow-up


def test_euler_with_an_exact_denoiser_lands_on_the_data():
    """For data that is one point c, D(x, σ) = c exactly, and Euler reaches c from any noise."""
    c = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    sigmas = uniform(Objective("flow"), 3)
    x = torch.randn_like(c) * sigmas[0]
    torch.testing.assert_close(sample_euler(lambda x, s: c, x, sigmas), c)


def test_euler_on_a_gaussian_matches_the_exact_ode():
    """Data N(0, 1): D(x, σ) = x / (1 + σ²); the probability-flow ODE keeps x / sqrt(1 + σ²) fixed."""
    sigmas = torch.exp(torch.linspace(math.log(80), math.log(0.01), 2000, dtype=torch.float64))
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    x = torch.randn(1000, dtype=torch.float64) * math.sqrt(1 + 80**2)
    out = sample_euler(lambda x, s: x / (1 + s**2), x, sigmas)
    torch.testing.assert_close(out, x / math.sqrt(1 + 80**2), atol=5e-3, rtol=0)


def test_bad_objective():
    with pytest.raises(ValueError, match="eps"):
        Objective("x0")


def test_v_target_is_the_velocity_of_the_vp_path():
    obj = Objective("v")
    x0, noise = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    _, v = obj.add_noise(x0, t, noise)
    a, s = obj.alpha_sigma(t)
    torch.testing.assert_close(v, a[:, None] * noise - s[:, None] * x0)
