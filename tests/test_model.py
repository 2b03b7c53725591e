"""The training objective: per-image noise, the noise cap, which tokens carry LM loss, learning."""

import torch
import torch.nn.functional as F

from conftest import digit
from mmgen.data.captions import CaptionSamples
from mmgen.data.digits import DigitsDataset
from mmgen.sequence import IGNORE
from mmgen.train.loop import TrainOptions, lr_at, train


def test_noise_is_drawn_per_image_and_capped_before_captions(model, builder, monkeypatch):
    seen = {}
    original = model.objective.add_noise

    def spy(x0, t, noise):
        seen["t"] = t.clone()
        return original(x0, t, noise)

    monkeypatch.setattr(model.objective, "add_noise", spy)
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
    x_t, _ = model.objective.add_noise(b.images, t, noise)
    tokens = model.image.embed_patches(model.image.patchify(x_t), t)
    h, _ = model(model.embed(b.ids, b.image_id, tokens), b.positions, b.doc_id, b.image_id)
    keep = b.labels != IGNORE
    assert not keep[b.image_id >= 0].any()
    ref = F.cross_entropy(model.logits(h[keep]), b.labels[keep])
    torch.testing.assert_close(out["lm"], ref)


def test_text_only_batches_work(model, builder):
    out = model.loss(builder([["just some words"]]))
    assert out["image"].item() == 0 and out["lm"].item() > 0


def test_training_reduces_both_losses(model, builder):
    samples = CaptionSamples(DigitsDataset("train"), seed=0)
    log = train(model, builder, samples, TrainOptions(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, log_every=20),
                show_progress=False)
    assert log[-1]["lm"] < log[0]["lm"] * 0.8
    assert log[-1]["image"] < log[0]["image"]
    assert not model.training


def test_learning_rate_schedule():
    o = TrainOptions(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, o) == 0.1 and lr_at(9, o) == 1.0
    assert abs(lr_at(55, o) - 0.55) < 1e-9 and abs(lr_at(100, o) - 0.1) < 1e-9


def test_caption_samples_are_deterministic_per_epoch():
    s = CaptionSamples(DigitsDataset("train"), seed=3)
    a = [type(s[i][0]).__name__ for i in range(50)]
    assert a == [type(s[i][0]).__name__ for i in range(50)]
    s.set_epoch(1)
    assert a != [type(s[i][0]).__name__ for i in range(50)]
