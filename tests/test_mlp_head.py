"""The per-token MLP diffusion head: it learns a conditional toy distribution and samples it."""

import torch

from mmgen.config import HeadConfig
from mmgen.heads.mlp import MLPHead


def test_loss_decreases_and_samples_follow_the_condition():
    torch.manual_seed(0)
    head = MLPHead(token_dim=4, cond_dim=2, cfg=HeadConfig(width=64, depth=2, repeat=4))
    centers = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 0.5]])  # class c -> target centre
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(300):
        cls = torch.randint(0, 2, (128,), generator=g)
        target = centers[cls] + 0.05 * torch.randn(128, 4, generator=g)
        loss = head.loss(target, torch.nn.functional.one_hot(cls, 2).float(), g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    z = torch.eye(2).repeat_interleave(64, 0)  # 64 rows of each class
    gens = [torch.Generator().manual_seed(i) for i in range(128)]
    x = head.sample(z, steps=16, generators=gens)
    assert x.shape == (128, 4)
    for c in range(2):
        assert (x[c * 64 : (c + 1) * 64].mean(0) - centers[c]).abs().max() < 0.15


def test_sampling_is_per_row_reproducible_and_guided():
    torch.manual_seed(0)
    head = MLPHead(3, 5, HeadConfig(width=16, depth=1))
    for p in head.parameters():  # a non-trivial (untrained) head
        torch.nn.init.normal_(p, std=0.2)
    z, zu = torch.randn(4, 5), torch.zeros(4, 5)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    a = head.sample(z, 4, generators=gens())
    b = head.sample(z[:2], 4, generators=gens()[:2])
    torch.testing.assert_close(a[:2], b)
    guided = head.sample(z, 4, guidance=3.0, z_uncond=zu, generators=gens())
    assert not torch.allclose(guided, a)
    torch.testing.assert_close(head.sample(z, 4, guidance=1.0, z_uncond=zu, generators=gens()), a)
