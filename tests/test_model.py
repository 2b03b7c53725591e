"""The training objective: per-image noise, the noise cap, which tokens carry LM loss (training with it:
tests/test_train_loop.py)."""

import torch
import torch.nn.functional as F
from conftest import digit

from mmgen.sequence import IGNORE


def test_noise_is_drawn_per_image_and_capped_before_captions(model, builder, monkeypatch):
    seen = {}
    original = model.image.objective.add_noise

    def spy(x0, t, noise):
        seen["t"] = t.clone()
        return original(x0, t, noise)

    monkeypatch.setattr(model.image.objective, "add_noise", spy)
    samples = [["a digit", digit(i)] for i in range(6)] + [[digit(i), "a caption"] for i in range(200)]
    b = builder(samples)
    model.loss(b, torch.Generator().manual_seed(0))
    t = seen["t"]
    assert len(t) == 206 and len(set(t[:6].tolist())) == 6  # one draw per image
    assert t[6:].max() <= 0.5 and t[6:].max() > 0.4  # capped at half the schedule, and uses the range


def test_lm_loss_is_the_mean_over_labelled_text(model, builder):
    b = builder([["a handwritten digit", digit(), "seven"], ["only text here"]])
    out = model.loss(b, torch.Generator().manual_seed(0))
    # recompute with the same noise
    gen = torch.Generator().manual_seed(0)
    n = b.images.shape[0]
    t = torch.rand(n, generator=gen)
    noise = torch.randn(b.images.shape, generator=gen)
    x_t, _ = model.image.objective.add_noise(b.images, t, noise)
    tokens = model.image.embed_patches(x_t, t)[0]
    h, _ = model(model.embed(b.ids, b.image_id, tokens), b.positions, b.doc_id, b.image_id)
    keep = b.labels != IGNORE
    assert not keep[b.image_id >= 0].any()
    ref = F.cross_entropy(model.logits(h[keep]), b.labels[keep])
    torch.testing.assert_close(out["lm"], ref)


def test_text_only_batches_work(model, builder):
    out = model.loss(builder([["just some words"]]))
    assert out["image"].item() == 0 and out["lm"].item() > 0
