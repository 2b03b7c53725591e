"""The decode loop: cached == uncached, determinism, batch == alone, sampling filters."""

import pytest
import torch
from conftest import digit

from mmgen.diffusion.guidance import Guidance
from mmgen.generation import Engine, GenerationOptions
from mmgen.sampling import sample_token


def image_denoiser(engine, cache, guidance, step_cache=None):
    """The diffusion interface's D(x, σ) on a prefilled cache, with the engine's null prompt."""
    null = engine.null_prefix()[0] if guidance.scale != 1 else None
    return engine.model.image.denoiser(engine.model, cache, guidance, null, step_cache)


def full_forward(model, builder, segments, t_image=0.0, noisy=None):
    """Uncached reference: one forward over the whole sequence (images at noise time t_image)."""
    b = builder([segments], add_eos=False)
    images = b.images if noisy is None else noisy
    tokens = model.image.embed_patches(images, torch.full((len(images),), t_image))[0] if len(images) else None
    h, _ = model(model.embed(b.ids, b.image_id, tokens), b.positions, b.doc_id, b.image_id)
    return b, h


def denoised_cached_and_uncached(model, builder, tokenizer):
    """D(x, σ) at t = 0.4 on the cache of "digit 3 <boi>", and the same x0 from one uncached forward over
    "digit 3 [x_t] a three" (`predict` given `embed_patches`' state); also the cache and the prompt parts."""
    prompt, after = tokenizer.encode("digit 3"), tokenizer.encode("a three")
    cache, _ = model.prefill(builder([[prompt, [tokenizer.boi_id]]], add_eos=False))
    x0, t = digit(3)[None], torch.tensor([0.4])
    sigma = model.image.objective.sigma(t)[0]
    x_ve = x0 + sigma * torch.randn_like(x0)
    got = image_denoiser(Engine(model, builder), cache, Guidance(scale=1.0))(x_ve, sigma)
    x_t = x_ve * model.image.objective.alpha_sigma(t)[0]
    b = builder([[prompt, x0[0], after]], add_eos=False)
    tokens, state = model.image.embed_patches(x_t, t)
    h, _ = model(model.embed(b.ids, b.image_id, tokens), b.positions, b.doc_id, b.image_id)
    pred = model.image.unpatchify(model.image.predict(h[0, b.image_id[0] >= 0][None], state))
    assert pred.abs().amax() > 1e-3  # a zero prediction would make cached == uncached trivially
    return got, model.image.objective.to_x0(x_t, pred, t), cache, (prompt, x0, after)


@torch.no_grad()
def test_cached_text_decoding_equals_uncached(model, builder, tokenizer):
    prompt = tokenizer.encode("a handwritten digit")
    cont = tokenizer.encode(" seven is drawn here")
    cache, last = model.prefill(builder([[prompt]], add_eos=False))
    cached = [model.logits(last)]
    for tid in cont:
        x = model.embed(torch.tensor([[tid]]), torch.tensor([[-1]]), None)
        cached.append(model.logits(model.extend(cache, x, torch.tensor([True]), False)[:, -1]))
    _, h = full_forward(model, builder, [prompt + cont])
    ref = model.logits(h[0, -len(cont) - 1 :])
    torch.testing.assert_close(torch.cat(cached), ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_cached_denoiser_and_clean_pass_equal_uncached(model, builder, tokenizer, objective):
    model.image.objective.__init__(objective)
    engine = Engine(model, builder)
    prompt, after = tokenizer.encode("digit 3"), tokenizer.encode("a three")
    cache, _ = model.prefill(builder([[prompt, [tokenizer.boi_id]]], add_eos=False))
    denoiser = image_denoiser(engine, cache, Guidance(scale=1.0))
    x0 = digit(3)[None]
    sigma = model.image.objective.sigma(torch.tensor([0.4]))[0]
    x_ve = x0 + sigma * torch.randn_like(x0)
    got = denoiser(x_ve, sigma)
    # uncached: the whole sequence with the image at t = 0.4, in the model's own x_t
    t = torch.tensor([0.4])
    a, _ = model.image.objective.alpha_sigma(t)
    x_t = x_ve * a
    b, h = full_forward(model, builder, [prompt, x0[0], after], t_image=0.4, noisy=x_t)
    slots = b.image_id[0] >= 0
    pred = model.image.unpatchify(model.image.predict(h[0, slots][None], None))
    torch.testing.assert_close(got, model.image.objective.to_x0(x_t, pred, t), atol=1e-4, rtol=1e-4)
    # the clean pass, then <eoi> and text: logits equal the uncached forward with the clean image
    tokens, _ = model.image.embed_patches(x0, torch.zeros(1))
    model.extend(cache, tokens, torch.tensor([True]), True)
    logits = []
    for tid in [tokenizer.eoi_id] + after:
        x = model.embed(torch.tensor([[tid]]), torch.tensor([[-1]]), None)
        logits.append(model.logits(model.extend(cache, x, torch.tensor([True]), False)[:, -1]))
    b, h = full_forward(model, builder, [prompt, x0[0], after])
    n = len(after) + 1
    torch.testing.assert_close(torch.cat(logits), model.logits(h[0, -n:]), atol=1e-4, rtol=1e-4)


OPTS = GenerationOptions(max_new_tokens=6, temperature=1.0, image_steps=4, guidance=2.0)


def test_same_seed_same_output(model, builder, tokenizer):
    engine = Engine(model, builder)
    prompts = [[tokenizer.encode("digit 5")]]
    a = engine.generate(prompts, OPTS, seed=3, force_image=True)
    b = engine.generate(prompts, OPTS, seed=3, force_image=True)
    c = engine.generate(prompts, OPTS, seed=4, force_image=True)
    assert torch.equal(a[0][0], b[0][0]) and a[0][1:] == b[0][1:]
    assert not torch.allclose(a[0][0], c[0][0])


def test_batched_sample_equals_sample_alone(model, builder, tokenizer):
    """Rows of different lengths, one drawing an image while the other waits, CFG on."""
    engine = Engine(model, builder)
    prompts = [[tokenizer.encode("a handwritten digit 7")], [digit(2), tokenizer.encode("this is")]]
    batch = engine.generate(prompts, OPTS, seed=[11, 12], force_image=[True, False])
    for i, p in enumerate(prompts):
        alone = engine.generate([p], OPTS, seed=[11 + i], force_image=[i == 0])[0]
        assert len(alone) == len(batch[i])
        for x, y in zip(alone, batch[i]):
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
            else:
                assert x == y
    assert isinstance(batch[0][0], torch.Tensor) and batch[0][0].shape == (1, 8, 8)
    assert (batch[0][0].abs() < 0.999).float().mean() > 0.5, "images must not be clamped flat, or the check is void"


def test_max_new_tokens_and_no_image_when_disallowed(model, builder, tokenizer):
    engine = Engine(model, builder)
    out = engine.generate([[tokenizer.encode("hello")]], GenerationOptions(max_new_tokens=5, max_images=0), seed=1)
    assert all(isinstance(s, list) for s in out[0]) and sum(len(s) for s in out[0]) <= 5


def test_sampling_filters():
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(400, 4)
    greedy = sample_token(logits, gens, temperature=0)
    assert (greedy == 0).all()
    top_k = sample_token(logits, gens, top_k=2)
    assert set(top_k.tolist()) <= {0, 1} and len(set(top_k.tolist())) == 2
    top_p = sample_token(logits, gens, top_p=0.7)  # 0.5 + 0.3 reaches 0.7
    assert set(top_p.tolist()) == {0, 1}
    min_p = sample_token(logits, gens, min_p=0.5)  # keeps p >= 0.25
    assert set(min_p.tolist()) == {0, 1}
    free = sample_token(logits, gens)
    assert set(free.tolist()) == {0, 1, 2, 3}


def test_bad_options():
    with pytest.raises(ValueError, match="sampler"):
        GenerationOptions(sampler="nope")
    with pytest.raises(ValueError, match=r"top_p = 0: must be a number in \(0, 1\]"):
        GenerationOptions(top_p=0)
    with pytest.raises(ValueError, match="shift"):
        GenerationOptions(shift="big")
    with pytest.raises(ValueError, match="noise"):
        GenerationOptions(noise="pink")


def test_generation_stops_at_the_context_limit(model, builder, tokenizer):
    engine = Engine(model, builder)
    long = [(tokenizer.encode("seven") * 90)[:90]]  # 91 of 96 positions with <bos>
    out = engine.generate([long, [tokenizer.encode("hi")]], GenerationOptions(max_new_tokens=50), seed=0)
    assert all(isinstance(s, list) for s in out[0]), "no room for an image: none is drawn"
    assert sum(len(s) for s in out[0]) <= 5  # the long row stops; the short one goes on in the same batch
    with pytest.raises(ValueError, match="an image needs 18 more positions"):
        engine.generate([long], GenerationOptions(max_new_tokens=5), force_image=True)
    with pytest.raises(ValueError, match="max_images"):
        engine.generate([[tokenizer.encode("hi")]], GenerationOptions(max_images=0), force_image=True)


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim", "dpmpp_2m", "dpmpp_2m_sde"])
def test_every_sampler_draws_and_stochastic_ones_are_batch_independent(model, builder, tokenizer, sampler):
    engine = Engine(model, builder)
    stochastic = {"eta": 1.0} if sampler in ("ddim", "dpmpp_2m_sde") else {}
    opts = GenerationOptions(max_new_tokens=1, image_steps=4, sampler=sampler, **stochastic, shift="auto",
                             guidance=Guidance(scale=2.0, kind="apg", eta=0.5))
    prompts = [[tokenizer.encode("digit 1")], [tokenizer.encode("a handwritten digit 9")]]
    batch = engine.generate(prompts, opts, seed=[3, 4], force_image=True)
    alone = engine.generate(prompts[1:], opts, seed=[4], force_image=True)
    assert batch[0][0].shape == (1, 8, 8) and torch.isfinite(batch[0][0]).all()
    torch.testing.assert_close(batch[1][0], alone[0][0], atol=1e-4, rtol=0)
    assert (alone[0][0].abs() < 0.999).float().mean() > 0.5, "images must not be clamped flat, or the check is void"


@torch.no_grad()
def test_first_block_cache_reuses_exactly_and_counts_hits(model, builder, tokenizer):
    from mmgen.diffusion.step_cache import FirstBlockCache

    engine = Engine(model, builder)
    cache, _ = model.prefill(builder([[tokenizer.encode("digit 3"), [tokenizer.boi_id]]], add_eos=False))
    x, sigma = torch.randn(1, 1, 8, 8), torch.tensor(2.0, dtype=torch.float64)
    plain = image_denoiser(engine, cache, Guidance(scale=2.0))(x, sigma)
    fbc = FirstBlockCache(threshold=0.05)
    d = image_denoiser(engine, cache, Guidance(scale=2.0), fbc)
    first, again = d(x, sigma), d(x, sigma)  # same input: the second call is a hit for both rows
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain, atol=1e-6, rtol=1e-6)
    assert (fbc.calls, fbc.skipped, fbc.row_hits) == (2, 1, 2)
    d(x * 3, sigma * 5)  # a different step: a miss
    assert fbc.skipped == 1 and fbc.skip_rate == pytest.approx(1 / 3)


@torch.no_grad()
def test_first_block_cache_decides_per_row(model, builder, tokenizer):
    """A row's reuse decision, and so its output, must not depend on the other rows."""
    from mmgen.diffusion.step_cache import FirstBlockCache

    engine = Engine(model, builder)
    prompt = builder([[tokenizer.encode("digit 3"), [tokenizer.boi_id]]] * 2, add_eos=False)
    cache, _ = model.prefill(prompt)
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor(2.0, dtype=torch.float64)
    alone = image_denoiser(engine, cache.select(torch.tensor([0])), Guidance(scale=1.0), FirstBlockCache(0.05))
    both = image_denoiser(engine, cache, Guidance(scale=1.0), FirstBlockCache(0.05))
    alone(x[:1], sigma), both(x, sigma)
    moved = x.clone()
    moved[1] += 3.0  # row 1 changes a lot, row 0 not at all
    out = both(moved, sigma)  # row 0 reuses, row 1 runs the remaining blocks alone
    torch.testing.assert_close(out[:1], alone(x[:1], sigma), atol=1e-6, rtol=1e-6)
    fresh = image_denoiser(engine, cache.select(torch.tensor([1])), Guidance(scale=1.0))(moved[1:], sigma)
    torch.testing.assert_close(out[1:], fresh, atol=1e-5, rtol=1e-5)


def test_generation_with_step_cache_reports_its_hit_rate(model, builder, tokenizer):
    engine = Engine(model, builder)
    opts = GenerationOptions(max_new_tokens=1, image_steps=10, cache_threshold=10.0)  # always reuse after step 1
    out = engine.generate([[tokenizer.encode("digit 2")]], opts, force_image=True)
    assert torch.isfinite(out[0][0]).all()
    assert (engine.step_cache.calls, engine.step_cache.skipped) == (10, 9)  # only the first step computes
    assert engine.step_cache.hit_rate == pytest.approx(18 / 20)  # two rows (CFG), both reuse from step 2
