"""Samplers against k-diffusion and diffusers on an analytic denoiser, convergence order, Brownian tree."""

import importlib.util
import math
import sys
import types

import pytest
import torch

from mmgen.diffusion.noise import BrownianTreeNoise, iid_noise
from mmgen.diffusion.objective import Objective
from mmgen.diffusion.samplers import SAMPLERS, sample_ddim, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler
from mmgen.diffusion.schedules import given, karras, make_sigmas, resolution_shift, uniform

torch.set_default_dtype(torch.float32)


class GaussianMixture:
    """Data = Σ π_k N(μ_k, s_k² I) in d dims; D(x, σ) = E[x0 | x0 + σ n = x] in closed form."""

    def __init__(self, d: int = 6, k: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(k, d, generator=g, dtype=torch.float64) * 2
        self.s2 = (torch.rand(k, generator=g, dtype=torch.float64) * 0.3 + 0.05) ** 2
        self.logpi = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x64, var = x.double(), self.s2 + sigma.double() ** 2  # (B, d), (K,)
        d = x.shape[-1]
        sq = ((x64[:, None, :] - self.mu[None]) ** 2).sum(-1)  # (B, K)
        logw = self.logpi - 0.5 * sq / var - 0.5 * d * torch.log(var)
        w = torch.softmax(logw, -1)  # (B, K)
        post = self.mu[None] + (self.s2 / var)[None, :, None] * (x64[:, None, :] - self.mu[None])  # (B, K, d)
        return (w[..., None] * post).sum(1).to(x.dtype)


def kdiffusion_sampling():
    """k_diffusion.sampling without the package __init__ (which imports torchvision, wandb, ...).
    Its one helper from k_diffusion.utils, append_dims, is given; the samplers are k-diffusion's own."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")}
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    try:
        s = importlib.util.spec_from_file_location("k_diffusion.sampling", spec.submodule_search_locations[0] + "/sampling.py")
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        return mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def start(sigmas, n=16, d=6, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigmas[0]


def test_dpmpp_2m_matches_k_diffusion_in_float64():
    K = kdiffusion_sampling()
    D = GaussianMixture()
    sigmas = karras(12, 0.02, 80.0)
    x = start(sigmas)
    ours = sample_dpmpp_2m(D, x, sigmas)
    ref = K.sample_dpmpp_2m(lambda x, s: D(x, s[0]), x, sigmas, disable=True)
    assert (ours - ref).abs().max().item() <= 1e-10


def test_dpmpp_2m_sde_matches_k_diffusion_with_the_same_noise():
    K = kdiffusion_sampling()
    D = GaussianMixture()
    sigmas = karras(10, 0.02, 80.0)
    x = start(sigmas)
    noise = BrownianTreeNoise(x, 0.02, 80.0, seeds=list(range(len(x))))
    ours = sample_dpmpp_2m_sde(D, x, sigmas, noise=noise)
    ref = K.sample_dpmpp_2m_sde(lambda x, s: D(x, s[0]), x, sigmas, disable=True, noise_sampler=noise)
    assert (ours - ref).abs().max().item() <= 1e-10


def test_heun_and_euler_match_k_diffusion():
    K = kdiffusion_sampling()
    D = GaussianMixture()
    sigmas = karras(8, 0.02, 80.0)
    x = start(sigmas)
    for ours, ref in ((SAMPLERS["heun"], K.sample_heun), (SAMPLERS["euler"], K.sample_euler)):
        a = ours(D, x, sigmas)
        b = ref(lambda x, s: D(x, s[0]), x, sigmas, disable=True)
        assert (a - b).abs().max().item() <= 1e-10


def test_dpmpp_2m_matches_diffusers_multistep_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    D = GaussianMixture()
    sched = DPMSolverMultistepScheduler(prediction_type="sample", algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(20)
    sigmas = sched.sigmas.double()
    x_ve = start(sigmas).float()
    x = x_ve / (1 + sigmas[0] ** 2).sqrt().float()  # diffusers works on VP samples x_t = α·x_VE
    for i, t in enumerate(sched.timesteps):
        s = sigmas[i]
        x0 = D(x.double() * (1 + s**2).sqrt(), s).float()
        x = sched.step(x0, t, x).prev_sample
    ours = sample_dpmpp_2m(D, x_ve.double(), sigmas)
    assert (ours - x.double()).abs().max().item() <= 2e-4


def test_euler_matches_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    D = GaussianMixture()
    ts = [0.97, 0.8, 0.6, 0.45, 0.3, 0.15, 0.05]
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=ts)
    flow_t = sched.sigmas.double()  # flow times, ending in 0
    x_t = torch.randn(16, 6, generator=torch.Generator().manual_seed(3)).float()
    x = x_t.clone()
    for i, t in enumerate(sched.timesteps):
        tt = flow_t[i]
        x0 = D(x.double() / (1 - tt), tt / (1 - tt)).float()
        v = (x - x0) / tt.float()  # velocity ε − x0 of the flow model
        x = sched.step(v, t, x).prev_sample
    sigmas = torch.cat([flow_t[:-1] / (1 - flow_t[:-1]), flow_t.new_zeros(1)])
    ours = sample_euler(D, x_t.double() / (1 - flow_t[0]), sigmas)
    assert (ours - x.double()).abs().max().item() <= 2e-4


def reference_ode(D, x, sigma_from, sigma_to):
    from scipy.integrate import solve_ivp

    shape = x.shape

    def f(s, y):
        xs = torch.from_numpy(y).view(shape)
        return ((xs - D(xs, torch.tensor(s, dtype=torch.float64))) / s).flatten().numpy()

    sol = solve_ivp(f, (sigma_from, sigma_to), x.flatten().numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    return torch.from_numpy(sol.y[:, -1]).view(shape)


def test_observed_order_of_dpmpp_2m():
    D = GaussianMixture()
    lo, hi = 0.05, 10.0
    x = start(torch.tensor([hi]))
    exact = reference_ode(D, x, hi, lo)
    errors = []
    for n in (8, 16, 32):
        sigmas = torch.exp(torch.linspace(math.log(hi), math.log(lo), n + 1, dtype=torch.float64))
        errors.append((sample_dpmpp_2m(D, x, sigmas) - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(orders) > 1.5, (errors, orders)
    euler = [(sample_euler(D, x, torch.exp(torch.linspace(math.log(hi), math.log(lo), n + 1,
              dtype=torch.float64))) - exact).abs().max().item() for n in (16, 32)]
    assert math.log2(euler[0] / euler[1]) < 1.3  # Euler is first order: the test can tell them apart


def test_brownian_tree_is_one_path_whatever_the_steps():
    x = torch.zeros(3, 5, dtype=torch.float64)
    a = BrownianTreeNoise(x, 0.01, 10.0, seeds=[1, 2, 3])
    b = BrownianTreeNoise(x, 0.01, 10.0, seeds=[1, 2, 3])
    s0, s1, s2 = torch.tensor(5.0), torch.tensor(2.0), torch.tensor(0.5)
    coarse = a(s0, s2) * (s0 - s2).sqrt()
    fine = b(s0, s1) * (s0 - s1).sqrt() + b(s1, s2) * (s1 - s2).sqrt()
    torch.testing.assert_close(coarse, fine, atol=1e-5, rtol=0)
    row = BrownianTreeNoise(x[:1], 0.01, 10.0, seeds=[2])
    torch.testing.assert_close(row(s0, s2), a(s0, s2)[1:2])  # a row depends only on its seed


def test_sde_samples_converge_with_brownian_noise_not_with_iid():
    D = GaussianMixture(d=4)
    lo, hi, rows = 0.01, 40.0, 8
    x = start(torch.tensor([hi]), n=rows, d=4, seed=5)

    def run(steps, noise):
        return sample_dpmpp_2m_sde(D, x, karras(steps, lo, hi), noise=noise)

    def tree():
        return BrownianTreeNoise(x, lo, hi, seeds=list(range(rows)))

    ref = run(400, tree())
    rms = lambda a: (a - ref).pow(2).mean().sqrt().item()  # noqa: E731
    tree_200, tree_50 = rms(run(200, tree())), rms(run(50, tree()))
    iid_200 = rms(run(200, iid_noise(x, torch.Generator().manual_seed(9))))
    assert tree_200 < tree_50
    assert tree_200 < iid_200 / 4, (tree_200, iid_200)


def test_ddim_eta_zero_is_euler_and_eta_one_is_stochastic():
    D = GaussianMixture()
    sigmas = karras(10, 0.02, 80.0)
    x = start(sigmas)
    torch.testing.assert_close(sample_ddim(D, x, sigmas, eta=0.0), sample_euler(D, x, sigmas), atol=0, rtol=0)
    a = sample_ddim(D, x, sigmas, eta=1.0, noise=iid_noise(x, torch.Generator().manual_seed(0)))
    b = sample_ddim(D, x, sigmas, eta=1.0, noise=iid_noise(x, torch.Generator().manual_seed(1)))
    assert (a - b).abs().max() > 1e-3


def test_schedules():
    obj = Objective("flow")
    u = uniform(obj, 10)
    assert len(u) == 11 and u[-1] == 0 and (u[:-1] > u[1:]).all()
    shifted = uniform(obj, 10, shift=3.0)
    assert (shifted[1:-1] > u[1:-1]).all()  # shift > 1 spends more steps at high noise
    k = karras(10, 0.002, 80.0)
    assert k[0].item() == pytest.approx(80.0) and k[-2].item() == pytest.approx(0.002) and k[-1] == 0
    assert resolution_shift(256) == pytest.approx(math.exp(0.5)) and resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert torch.equal(given([3.0, 1.0, 0.5]), torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="decreasing"):
        given([1.0, 2.0])
    with pytest.raises(ValueError, match="unknown schedule"):
        make_sigmas(obj, 10, "cosine")
