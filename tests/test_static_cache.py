"""The preallocated KV cache: written in place, copies that never alias, growth, and generation through it
equal to the uncached forward, to the former concatenating cache (golden outputs) and to itself at static
shapes (the path `mmgen.capture` runs as a CUDA graph on CUDA)."""

import pytest
import torch
from conftest import ScriptedFeed, digit
from test_interfaces import builder_for, make

from mmgen import capture
from mmgen.diffusion.guidance import Guidance
from mmgen.generation import Engine, GenerationOptions, Join
from mmgen.kv_cache import GRANULE, KVCache, pad_and_stack

MODES = ["eager", "static"]


def small_cache(rows: int, length: int, room: int = 0, seed: int = 0) -> KVCache:
    """A filled cache of random keys/values (2 layers, 2 heads, head dim 4), `length` slots per row."""
    g = torch.Generator().manual_seed(seed)
    kv = [(torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 4, generator=g)) for _ in range(2)]
    doc = torch.zeros(rows, length, dtype=torch.long)
    image = torch.full((rows, length), -1)
    return KVCache.filled(kv, doc, image, torch.full((rows,), length), images=0, room=room)


def test_capacity_is_reserved_up_front_and_grows_geometrically_keeping_the_slots():
    cache = small_cache(2, 5, room=10)
    assert (cache.capacity, cache.length) == (GRANULE, 5)
    before = cache.keys[1][:, :, :5].clone()
    cache.steps["x"] = object()  # a captured step over the old buffers
    cache.reserve(GRANULE + 1)
    assert cache.capacity == 2 * GRANULE and cache.steps == {}
    assert torch.equal(cache.keys[1][:, :, :5], before) and (cache.slot_doc[:, 5:] == -1).all()
    cache.reserve(5 * GRANULE - 3)  # more than double: what is asked, rounded up to the granule
    assert cache.capacity == 5 * GRANULE


def test_select_pad_and_stack_and_drop_empty_make_copies_that_never_alias():
    a, b = small_cache(2, 5, seed=1), small_cache(1, 9, seed=2)
    picked = a.select(torch.tensor([1]))
    stacked = pad_and_stack([a, b])
    assert (stacked.length, stacked.slot_doc.shape[0]) == (9, 3)
    assert (stacked.doc_id[:2, 5:] == -1).all() and (stacked.doc_id[2] == 0).all()  # padding is empty slots
    assert torch.equal(stacked.keys[0][1, :, :5], a.keys[0][1, :, :5])
    for copy in (picked, stacked):
        copy.keys[0].fill_(7.0)
    assert not (a.keys[0] == 7.0).any() and not (b.keys[0] == 7.0).any()
    stacked.slot_doc[:2, 5:9] = -1  # rows 0-1 never used slots 5..8; now row 2 leaves
    kept = stacked.select(torch.tensor([0, 1])).drop_empty()
    assert kept.length == 5 and torch.equal(kept.keys[0][:, :, :5], stacked.keys[0][:2, :, :5])
    assert kept.drop_empty() is kept  # nothing left to drop


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_text_decoding_through_a_growing_cache_equals_the_uncached_forward(model, builder, tokenizer, mode):
    prompt = tokenizer.encode("a handwritten digit")
    cont = (tokenizer.encode(" seven is drawn here and") * 12)[: 80 - len(prompt)]
    with capture.using(mode):
        cache, last = model.prefill(builder([[prompt]], add_eos=False))  # no room: it must grow on the way
        logits = [model.logits(last)]
        for tid in cont:
            x = model.embed(torch.tensor([[tid]]))
            logits.append(model.logits(model.extend(cache, x, torch.tensor([True]), False)[:, -1]))
    assert cache.capacity == 2 * GRANULE and cache.length == len(prompt) + 1 + len(cont)
    b = builder([[prompt + cont]], add_eos=False)
    h, _ = model(model.embed(b.ids, b.image_id, None), b.positions, b.doc_id, b.image_id)
    torch.testing.assert_close(torch.cat(logits), model.logits(h[0, -len(cont) - 1:]), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_the_static_denoiser_step_equals_the_eager_one_with_guidance(model, builder, tokenizer):
    engine = Engine(model, builder)
    prompts = [[tokenizer.encode("digit 3"), [tokenizer.boi_id]], [tokenizer.encode("a handwritten digit 8"),
                                                                     [tokenizer.boi_id]]]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in MODES:
        with capture.using(mode):
            cache, _ = model.prefill(builder(prompts, add_eos=False), room=20)
            before = [k.clone() for k in cache.keys]
            guidance = Guidance(scale=2.5, interval=(1.0, 5.0))  # σ = 3 runs both branches, σ = 0.5 the rows alone
            d = model.image.denoiser(model, cache, guidance, engine.null_prefix()[0])
            out[mode] = [d(x, torch.tensor(s, dtype=torch.float64)) for s in (3.0, 0.5, 0.5)]
        assert all(torch.equal(k[:, :, :cache.length], b[:, :, :cache.length]) for k, b in zip(cache.keys, before))
        assert len(cache.steps) == (mode == "static")  # one static step over the rows' cache, used twice
    for a, b in zip(out["eager"], out["static"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def outputs_match(got: list, want: list, atol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert type(x) is type(y)
        if isinstance(x, list):
            assert x == y
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


def scenario(engine, tokenizer, opts) -> list:
    """Three rows with CFG: two draw, one reads an image; each its own token limit, so they end apart."""
    prompts = [[tokenizer.encode("a handwritten digit 7")], [digit(2), tokenizer.encode("this is")],
               [tokenizer.encode("seven")]]
    return engine.generate(prompts, opts, seed=[5, 6, 7], force_image=[True, False, True], max_new_tokens=[8, 3, 6])


def summary(outputs: list) -> list:
    return [[s if isinstance(s, list) else [round(float(s.sum()), 4), round(float(s.abs().sum()), 4)] for s in row]
            for row in outputs]


def assert_golden(outputs: list, golden: list) -> None:
    """Tokens exactly, images by their sum and absolute sum (within 1e-3)."""
    got = summary(outputs)
    assert [[type(s) for s in r] for r in got] == [[type(s) for s in r] for r in golden]
    for row, want in zip(got, golden):
        for s, w in zip(row, want):
            if isinstance(w[0], int):
                assert s == w
            else:
                assert s == pytest.approx(w, abs=1e-3)


# Outputs of the engine over the former cache (torch.cat of every chunk), same seeds and models: pinned here.
GOLDEN = {
    "diffusion": [[[9.00397, 40.75056], [46, 111, 95, 57, 98, 345]], [[91, 59, 241]],
                  [[2.30359, 38.30424], [238, 379, 205, 210]]],
    "feed": [[[2.43337, 38.07539], [238, 379, 205, 210, 82, 173, 106, 166]], [[318, 293, 382]],
             [[1.66603, 39.96015], [420, 424]]],
    "discrete": [[[2.4134, 21.33556], [36, 304, 118, 172]], [[107, 244, 398, 354]],
                 [[1.61499, 21.64071], [77, 140, 240]]],
}
DIFFUSION_OPTS = GenerationOptions(max_new_tokens=8, temperature=1.0, image_steps=3, guidance=2.0)


@pytest.mark.parametrize("mode", MODES)
def test_diffusion_generation_equals_the_former_cache_and_batch_equals_alone(model, builder, tokenizer, mode):
    engine = Engine(model, builder)
    with capture.using(mode):
        batch = scenario(engine, tokenizer, DIFFUSION_OPTS)
        alone = engine.generate([[tokenizer.encode("seven")]], DIFFUSION_OPTS, seed=[7], force_image=[True],
                                max_new_tokens=[6])[0]
    assert_golden(batch, GOLDEN["diffusion"])
    outputs_match(batch[2], alone)


@pytest.mark.parametrize("mode", MODES)
def test_rows_joining_and_leaving_equal_the_former_cache(model, builder, tokenizer, mode):
    """A row joins mid-way (pad_and_stack), one is cancelled and others end (select, drop_empty)."""
    engine = Engine(model, builder)
    prompts = [[tokenizer.encode("a handwritten digit 7")], [digit(2), tokenizer.encode("this is")]]

    feed = ScriptedFeed(Join([tokenizer.encode("seven")], seed=9, max_new_tokens=4, force_image=True))
    with capture.using(mode):
        events = list(engine.stream(prompts, DIFFUSION_OPTS, seed=[7, 8], force_image=[True, False],
                                    max_new_tokens=[10, 10], feed=feed))
    assert_golden(events[-1].outputs, GOLDEN["feed"])


@pytest.mark.parametrize("mode", MODES)
def test_a_causal_interface_draws_as_through_the_former_cache(tokenizer, mode):
    model = make("discrete", len(tokenizer))
    engine = Engine(model, builder_for(model, tokenizer))
    opts = GenerationOptions(max_new_tokens=6, temperature=1.0, guidance=2.0)
    prompts = [[tokenizer.encode("a handwritten digit 7")], [digit(2), tokenizer.encode("this is")],
               [tokenizer.encode("seven")]]
    with capture.using(mode):
        out = engine.generate(prompts, opts, seed=[1, 2, 3], force_image=[True, False, True], max_new_tokens=[6, 4, 5])
        alone = engine.generate(prompts[:1], opts, seed=[1], force_image=[True], max_new_tokens=[6])[0]
    assert_golden(out, GOLDEN["discrete"])
    outputs_match(out[0], alone)
