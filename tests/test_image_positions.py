"""2-D positions for image slots (M-RoPE, `backbone.image_positions = "2d"`): the rule of `mmgen.positions`
pinned by hand and on packed rows; text-only logits equal "1d" and transformers' Llama; outputs differ from
"1d" exactly on image slots and the text after them; cached == uncached and batch == alone for the diffusion
interface; a training run; save / load; old configs; the causal interfaces refuse it."""

import pytest
import torch
from conftest import digit
from test_backbone import hf_tiny, our_logits
from test_generation import OPTS, denoised_cached_and_uncached, full_forward
from test_interfaces import assert_causal_interfaces_refuse
from train_helpers import MICRO_MODEL, restore_threads  # noqa: F401 (autouse fixture)
from train_helpers import micro_config as train_config

from mmgen import capture
from mmgen.backbone import RotaryEmbedding
from mmgen.config import BackboneConfig, ModelConfig
from mmgen.errors import ConfigError
from mmgen.generation import Engine
from mmgen.model import MMGenModel
from mmgen.positions import section_index, sequence_positions
from mmgen.train.config import TrainConfig
from mmgen.train.overrides import build
from mmgen.train.packing import Item, Packer
from mmgen.train.tracking import read_log
from mmgen.train.trainer import Trainer

G = 4  # the conftest model: 8×8 digits, 2×2 patches -> a 4×4 grid, L = 16


def with_positions(model: MMGenModel, mode: str) -> MMGenModel:
    """The same weights under backbone.image_positions = `mode`."""
    cfg = ModelConfig.from_dict(model.config.to_dict())
    cfg.backbone.image_positions = mode
    other = MMGenModel(cfg)
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.fixture
def model2d(model) -> MMGenModel:
    return with_positions(model, "2d")


def expected(segments) -> list[tuple[int, int, int]]:
    """The documented rule, token by token: text (p, p, p) and p + 1 next; image slot (r, c) at (p, p + r, p + c)
    after <boi> at p − 1, and <eoi> at p + g."""
    out, p = [(0, 0, 0)], 1  # <bos>
    for seg in segments:
        if isinstance(seg, list):
            out += [(p + i,) * 3 for i in range(len(seg))]
            p += len(seg)
        else:
            out.append((p,) * 3)  # <boi>
            out += [(p + 1, p + 1 + k // G, p + 1 + k % G) for k in range(G * G)]
            out.append((p + 1 + G,) * 3)  # <eoi>
            p += G + 2
    return out


def test_rows_and_columns_each_turn_fast_and_slow_pairs():
    """Interleaved: pair j turns with component j mod 3. One step along a row or down a column then turns
    some pair by over 0.4 rad at the tiny preset's head dim 48 (Qwen2-VL's contiguous layout: columns at
    most 0.003 rad, so a small grid's columns were nearly indistinguishable)."""
    assert section_index(48).tolist() == [0, 1, 2] * 8 and section_index(6).tolist() == [0, 1, 2]
    rotary = RotaryEmbedding(48, 10_000.0)
    angles = {}
    for name, pos in {"origin": (5, 5, 5), "next column": (5, 5, 6), "next row": (5, 6, 5)}.items():
        cos, sin = rotary(torch.tensor([[pos]]), torch.float32)  # (1, 1, 1, E)
        angles[name] = torch.atan2(sin, cos)[0, 0, 0, :24]  # (E/2,) the angle of each pair
    for step in ("next column", "next row"):
        turned = (angles[step] - angles["origin"]).abs()
        assert turned.max() > 0.4 and turned.min() == 0  # fast pairs turn; the other components' pairs do not


def test_text_only_logits_equal_1d_and_transformers_llama(tmp_path):
    hf, ours = hf_tiny(tmp_path, tied=True)
    ours2d = with_positions(ours, "2d")
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        got = our_logits(ours2d, ids)
        assert torch.equal(got, our_logits(ours, ids))
        assert (got - hf(ids).logits).abs().max().item() <= 1e-5


def test_the_rule_by_hand_and_on_packed_rows(builder, tokenizer):
    a, b = tokenizer.encode("a digit"), tokenizer.encode("seven")
    segments = [a, digit(0), b, digit(1), a]
    batch = builder([segments], add_eos=False)
    got = sequence_positions(batch.positions, batch.image_id, G, "2d")[0]  # (T, 3)
    assert got.tolist() == [list(p) for p in expected(segments)]
    same = (got == batch.positions[0, :, None]).all(-1)  # (T,) where "2d" equals "1d"
    first_slot = int((batch.image_id[0] >= 0).nonzero()[0])
    assert same[:first_slot + 1].all() and not same[first_slot + 1:].any()  # slot (0, 0) is (p, p, p) in both
    samples = [[b, digit(2)], segments, [digit(3), a]]  # one packed row of three documents
    items = [Item(*builder.tokens(s, add_eos=False)) for s in samples]
    packed = Packer(tokenizer.pad_id, 1, 8, "pack", 200)(items).batch
    assert packed.ids.shape[0] == 1
    rows = sequence_positions(packed.positions, packed.image_id, G, "2d")[0]  # (T, 3)
    for doc in range(3):  # the packer orders documents its own way: find each by its ids
        here = packed.doc_id[0] == doc
        sample = next(s for s, it in zip(samples, items) if packed.ids[0, here].tolist() == it.ids)
        assert rows[here].tolist() == [list(p) for p in expected(sample)]


@torch.no_grad()
def test_outputs_change_exactly_on_image_slots_and_the_text_after(model, model2d, builder, tokenizer):
    segments = [tokenizer.encode("digit 3"), digit(3), tokenizer.encode("a three")]
    batch, h1 = full_forward(model, builder, segments, t_image=0.3)
    _, h2 = full_forward(model2d, builder, segments, t_image=0.3)
    differs = (h1[0] - h2[0]).abs().amax(-1) > 1e-6  # (T,)
    first_slot = int((batch.image_id[0] >= 0).nonzero()[0])
    assert torch.equal(h1[0, :first_slot], h2[0, :first_slot]) and differs[first_slot:].all()


@torch.no_grad()
def test_cached_denoiser_clean_pass_and_text_equal_uncached(model2d, builder, tokenizer):
    model = model2d
    got, want, cache, (prompt, x0, after) = denoised_cached_and_uncached(model, builder, tokenizer)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.extend(cache, model.image.embed_patches(x0, torch.zeros(1))[0], torch.tensor([True]), True)
    assert cache.next_position.tolist() == [1 + len(prompt) + 1 + G]  # <eoi> continues at p + g
    logits = [model.logits(model.extend(cache, model.embed(torch.tensor([[i]])), torch.tensor([True]), False)[:, -1])
              for i in [tokenizer.eoi_id] + after]
    _, h = full_forward(model, builder, [prompt, x0[0], after])
    torch.testing.assert_close(torch.cat(logits), model.logits(h[0, -len(after) - 1:]), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_prompt_images_prefill_and_decode_equal_uncached(model2d, builder, tokenizer):
    prompt, cont = [digit(2), tokenizer.encode("this is"), digit(5)], tokenizer.encode(" a two and a five")
    cache, last = model2d.prefill(builder([prompt], add_eos=False))
    assert cache.next_position.tolist() == [expected(prompt)[-1][0] + 1]
    logits = [model2d.logits(last)]
    for i in cont:
        logits.append(model2d.logits(model2d.extend(cache, model2d.embed(torch.tensor([[i]])), torch.tensor([True]),
                                                    False)[:, -1]))
    _, h = full_forward(model2d, builder, prompt + [cont])
    torch.testing.assert_close(torch.cat(logits), model2d.logits(h[0, -len(cont) - 1:]), atol=1e-4, rtol=1e-4)


def generate(model, builder, tokenizer, rows=(0, 1)) -> list:
    prompts = [[tokenizer.encode("a handwritten digit 7")], [digit(2), tokenizer.encode("this is")]]
    return Engine(model, builder).generate([prompts[i] for i in rows], OPTS, seed=[11 + i for i in rows],
                                           force_image=[i == 0 for i in rows])


def assert_same(a: list, b: list, atol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, atol=atol, rtol=0)
        else:
            assert x == y


def test_batch_equals_alone_and_save_load_keeps_outputs(model2d, builder, tokenizer, tmp_path):
    batch = generate(model2d, builder, tokenizer)
    for i in (0, 1):
        assert_same(generate(model2d, builder, tokenizer, rows=(i,))[0], batch[i])
    assert isinstance(batch[0][0], torch.Tensor) and len(batch[0]) == 2  # an image, then text after it
    with capture.using("static"):  # the static-shape steps that CUDA graphs capture
        assert_same(generate(model2d, builder, tokenizer)[0], batch[0])
    model2d.save_pretrained(tmp_path)
    loaded = MMGenModel.from_pretrained(tmp_path)
    assert loaded.config == model2d.config and loaded.config.backbone.image_positions == "2d"
    assert_same(generate(loaded, builder, tokenizer)[0], batch[0], atol=0)


def test_a_training_run_with_2d_positions(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    model = {**MICRO_MODEL, "backbone": {**MICRO_MODEL["backbone"], "image_positions": "2d"}}
    cfg = train_config(tmp_path / "run", tmp_path, model=model, train={"steps": 2}, checkpoint={"every": 0},
                       log={"every": 1})
    log = read_log(Trainer(build(TrainConfig, cfg)).fit())
    assert [r["step"] for r in log] == [1, 2] and all(r["image"] > 0 and r["lm"] > 0 for r in log)
    assert MMGenModel.from_pretrained(tmp_path / "run").config.backbone.image_positions == "2d"


def test_old_configs_load_with_1d_and_causal_interfaces_refuse_2d(tokenizer):
    old = ModelConfig().to_dict()
    del old["backbone"]["image_positions"]  # a config.json written before the field existed
    assert ModelConfig.from_dict(old).backbone.image_positions == "1d"
    assert ModelConfig.load("mmgen/assets/chat-tiny/config.json").backbone.image_positions == "1d"
    with pytest.raises(ConfigError, match="image_positions = '3d': must be one of '1d', '2d'"):
        BackboneConfig(image_positions="3d")
    assert_causal_interfaces_refuse(tokenizer, lambda cfg: setattr(cfg.backbone, "image_positions", "2d"),
                                    "not supported by the '{case}' interface yet")
