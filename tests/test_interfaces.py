"""Every image interface under the same backbone: training loss, attention inside images, cached
token-by-token drawing equal to teacher forcing, batch independence (for every understanding input),
tokenizer/config checks."""

import dataclasses

import pytest
import torch
from conftest import digit

from mmgen import events
from mmgen.config import BackboneConfig, HeadConfig, ImageConfig, ImageTokenizerConfig, ModelConfig
from mmgen.diffusion.guidance import Guidance
from mmgen.errors import ConfigError
from mmgen.generation import Engine, GenerationOptions
from mmgen.interfaces.base import ImageInterface
from mmgen.interfaces.registry import INTERFACES
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBuilder
from mmgen.tokenizers.image import ImageTokens, build_image_tokenizer

HEAD = HeadConfig(width=32, depth=2, steps=3)


def tokenizer_config(kind: str) -> ImageTokenizerConfig:
    codes = 16 if kind in ("vq", "hybrid") else 0
    return ImageTokenizerConfig(kind=kind, channels=1, resolution=8, latent_channels=3, downsample=2,
                                codebook_size=codes, width=8)


CASES = {
    "diffusion-vae": lambda: ImageConfig("diffusion", tokenizer_config("vae"), patch_size=1),
    "discrete": lambda: ImageConfig("discrete", tokenizer_config("vq"), patch_size=1),
    "hybrid": lambda: ImageConfig("hybrid", tokenizer_config("hybrid"), patch_size=1, head=HEAD),
    "mar": lambda: ImageConfig("mar", patch_size=2, head=HEAD),  # raw pixels, 2×2 patches
}
CAUSAL = ["discrete", "hybrid", "mar"]
INPUTS = ["codes", "latents", "encoder"]  # ImageConfig.understanding_input
# every causal interface with codes, and each other input on some interface (tiny models: seconds)
CAUSAL_INPUTS = [(case, "codes") for case in CAUSAL] + [("discrete", "latents"), ("mar", "latents"),
                                                        ("hybrid", "encoder")]


def tiny_vision_dir(path, kind: str = "siglip") -> str:
    """A random 1-layer SigLIP (no CLS token) or CLIP (CLS first) vision model saved in `path`:
    32×32 RGB in 4×4 patches, an 8×8 grid of 16 features."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config_cls, model_cls = (SiglipVisionConfig, SiglipVisionModel) if kind == "siglip" else (
        CLIPVisionConfig, CLIPVisionModel)
    config = config_cls(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        image_size=32, patch_size=4, num_channels=3)
    model_cls(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def vision_dir(tmp_path_factory) -> str:
    return tiny_vision_dir(tmp_path_factory.mktemp("siglip"))


def make(case: str, vocab: int, understanding: str = "codes", encoder: str | None = None) -> MMGenModel:
    torch.manual_seed(0)
    bb = BackboneConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    image = dataclasses.replace(CASES[case](), understanding_input=understanding, understanding_encoder=encoder)
    model = MMGenModel(ModelConfig(backbone=bb, image=image))
    with torch.no_grad():  # untrained heads start at zero; make every output depend on its input
        for name, p in model.image.named_parameters():
            if p.dim() >= 2 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
        for p in model.image_tokenizer.parameters():
            p.normal_(0, 0.1) if p.dim() >= 2 else None
    return model.eval()


def assert_causal_interfaces_refuse(tokenizer, change, match: str) -> None:
    """Each causal interface's model with `change(config)` applied raises a ConfigError matching `match`
    (its `{case}` filled with the interface's name)."""
    for case in ("discrete", "hybrid", "mar"):
        cfg = make(case, len(tokenizer)).config
        change(cfg)
        with pytest.raises(ConfigError, match=match.format(case=case)):
            MMGenModel(cfg)


def builder_for(model, tokenizer) -> SequenceBuilder:
    c = model.config
    return SequenceBuilder(tokenizer, 1, 8, c.image.tokens_per_image, c.backbone.max_position_embeddings)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_trains_the_interface_not_the_tokenizer(case, tokenizer):
    model = make(case, len(tokenizer)).train()
    batch = builder_for(model, tokenizer)([["a digit", digit(0)], [digit(1), "seven"], ["just text"]])
    out = model.loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["image"] > 0 and out["images"] == 2
    out["loss"].backward()
    assert all(p.grad is not None for p in model.image.parameters())
    assert all(p.grad is None for p in model.image_tokenizer.parameters())
    assert not model.image_tokenizer.training


@pytest.mark.parametrize("case", CAUSAL)
def test_attention_inside_images_is_causal(case, tokenizer):
    model = make(case, len(tokenizer))
    batch = builder_for(model, tokenizer)([["a digit", digit(0), "after"]])
    x = model.embed(batch.ids, batch.image_id, model.image.embed(model.encode_images(batch.images)))
    slots = (batch.image_id[0] >= 0).nonzero().flatten()
    j = slots[len(slots) // 2]
    y = x.clone()
    y[0, j] += 1.0
    a, _ = model(x, batch.positions, batch.doc_id, batch.image_id)
    b, _ = model(y, batch.positions, batch.doc_id, batch.image_id)
    changed = (a - b).abs().amax(-1)[0] > 1e-6  # (T,)
    assert not changed[:j].any() and changed[j:].all()


def draw_with_spy(model, engine, prompts, opts, seed):
    """Generate, recording the conditioning hidden states handed to the interface at every token."""
    seen = []
    original = model.image.sample_step

    def spy(cond, uncond, request):
        seen.append(cond.clone())
        return original(cond, uncond, request)

    model.image.sample_step = spy
    try:
        out = engine.generate(prompts, opts, seed=seed, force_image=True)
    finally:
        del model.image.sample_step
    return out, torch.stack(seen, 1)  # (R, L, D)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("case, understanding", CAUSAL_INPUTS)
def test_cached_drawing_equals_teacher_forcing(case, guidance, understanding, tokenizer, vision_dir):
    """Drawing stays on the interface's own tokens whatever the understanding input."""
    model = make(case, len(tokenizer), understanding, vision_dir)
    builder = builder_for(model, tokenizer)
    engine = Engine(model, builder)
    prompt = tokenizer.encode("draw a seven")
    opts = GenerationOptions(max_new_tokens=1, guidance=guidance)
    tokens_drawn = []
    original = model.image.assemble
    model.image.assemble = lambda steps: tokens_drawn.append(original(steps)) or tokens_drawn[-1]
    try:
        out, seen = draw_with_spy(model, engine, [[prompt]], opts, seed=3)
    finally:
        del model.image.assemble
    tokens = tokens_drawn[0]
    if tokens.codes is not None:
        assert tokens.codes.dtype == torch.long and 0 <= tokens.codes.min() and tokens.codes.max() < 16
    assert out[0][0].shape == (1, 8, 8)
    # teacher forcing: the prompt, <boi> and the drawn tokens in one uncached pass
    batch = builder([[prompt, torch.zeros(1, 8, 8)]])
    x = model.embed(batch.ids, batch.image_id, model.image.embed(tokens))
    hidden, _ = model(x, batch.positions, batch.doc_id, batch.image_id)
    slots = batch.image_id[0] >= 0
    before = torch.zeros_like(slots)
    before[:-1] = slots[1:]
    torch.testing.assert_close(seen[0], hidden[0, before], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case, understanding", CAUSAL_INPUTS)
def test_a_row_draws_the_same_alone_or_in_a_batch(case, understanding, tokenizer, vision_dir):
    model = make(case, len(tokenizer), understanding, vision_dir)
    engine = Engine(model, builder_for(model, tokenizer))
    prompts = [[tokenizer.encode("a long prompt about the digit three")], [digit(4), tokenizer.encode("two")]]
    opts = GenerationOptions(max_new_tokens=3, guidance=2.0)
    both = engine.generate(prompts, opts, seed=[5, 6], force_image=True)
    alone = engine.generate(prompts[1:], opts, seed=[6], force_image=True)
    torch.testing.assert_close(both[1][0], alone[0][0], atol=1e-5, rtol=1e-5)
    assert both[1][1:] == alone[0][1:]


def test_tokenizer_that_does_not_match_the_config_is_refused(tokenizer):
    cfg = make("discrete", len(tokenizer)).config
    other = build_image_tokenizer(dataclasses.replace(cfg.image.tokenizer, codebook_size=32))
    with pytest.raises(ValueError, match="codebook_size"):
        MMGenModel(cfg, image_tokenizer=other)
    bad = {"needs a discrete": ImageConfig("discrete", tokenizer_config("vae"), patch_size=1),
           "patch_size=1": ImageConfig("discrete", tokenizer_config("vq"), patch_size=2),
           "needs a 'hybrid'": ImageConfig("hybrid", tokenizer_config("vq"), patch_size=1),
           "needs a continuous": ImageConfig("mar", tokenizer_config("vq"), patch_size=1),
           "unknown image interface 'nope'": ImageConfig("nope")}
    for message, image in bad.items():  # the interface checks its config when the model is built
        with pytest.raises(ValueError, match=message):
            MMGenModel(dataclasses.replace(cfg, image=image))


@pytest.mark.parametrize("case", ["discrete", "hybrid"])
def test_save_load_keeps_the_image_tokenizer(case, tokenizer, tmp_path):
    model = make(case, len(tokenizer))
    model.save_pretrained(tmp_path, tokenizer)
    again = MMGenModel.from_pretrained(tmp_path)
    images = torch.stack([digit(i) for i in range(4)])
    a, b = model.encode_images(images), again.encode_images(images)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(model.decode_images(a), again.decode_images(b))


def test_codes_of_conditioning_images_are_corrupted_only_in_training(tokenizer):
    model = make("discrete", len(tokenizer)).train()
    tokens = model.encode_images(torch.stack([digit(i) for i in range(64)]))
    conditions = torch.arange(64) < 32  # the first half precede their text
    g = torch.Generator().manual_seed(0)
    inputs, targets = model.image.train_inputs(tokens, conditions, g)
    clean = model.image.embed(tokens)
    changed = (inputs - clean).abs().amax(-1) > 0  # (N, L)
    assert changed[:32].any() and not changed[32:].any()
    assert changed[:32].float().mean() < 0.5  # at most half, a quarter on average
    assert torch.equal(targets.codes, tokens.codes)
    model.eval()
    inputs, _ = model.image.train_inputs(tokens, conditions, g)
    assert torch.equal(inputs, clean)


# -- the contract: a new interface is one class plus one registry line -----------------------------


@dataclasses.dataclass
class NoOptions:
    """The trivial interface takes no image sampling options."""


class OneShot(ImageInterface):
    """A trivial interface defined here: every patch is predicted at once from the hidden state at <boi>."""

    name = "one-shot"
    causal = True
    Options = NoOptions

    def __init__(self, config):
        super().__init__(config)
        self.proj_in = torch.nn.Linear(self.cfg.patch_dim, self.hidden_size)
        self.proj_out = torch.nn.Linear(self.hidden_size, self.cfg.tokens_per_image * self.cfg.patch_dim)

    def embed(self, tokens):
        return self.proj_in(self.patchify(tokens.latents))

    def train_inputs(self, tokens, conditions, generator):
        return self.embed(tokens), self.patchify(tokens.latents)

    def loss(self, targets, slots, prev, generator=None):
        return (self.proj_out(prev[:, 0]).view_as(targets) - targets).pow(2).mean((1, 2))

    def draw(self, request):
        patches = self.proj_out(request.last).view(request.rows, self.cfg.tokens_per_image, -1)  # (R, L, P)
        yield events.ImageStep(list(range(request.rows)), 1, 1)
        return ImageTokens(latents=self.unpatchify(patches))


def test_an_interface_defined_outside_the_package_trains_and_draws(tokenizer, monkeypatch):
    monkeypatch.setitem(INTERFACES, "one-shot", OneShot)
    bb = BackboneConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96)
    model = MMGenModel(ModelConfig(backbone=bb, image=ImageConfig("one-shot", patch_size=2)))
    builder = builder_for(model, tokenizer)
    out = model.train().loss(builder([["a digit", digit(0)], [digit(1), "one"]]))
    out["loss"].backward()
    assert out["images"] == 2 and model.image.proj_out.weight.grad.abs().sum() > 0
    engine = Engine(model, builder)
    stream = [e for e in engine.stream([[tokenizer.encode("two")], [tokenizer.encode("six")]], GenerationOptions(
        max_new_tokens=1), seed=0, force_image=[False, True]) if not isinstance(e, events.Token)]
    kinds = [type(e).__name__ for e in stream]
    assert kinds[:3] == ["ImageStart", "ImageStep", "ImageDone"] and kinds[-1] == "Done"
    assert stream[0].rows == [1] and stream[1].rows == [1] and stream[2].row == 1  # the engine's row numbers
    with torch.no_grad():  # the drawing is the prediction from the hidden state at the forced <boi>
        _, last = model.prefill(builder([[tokenizer.encode("six"), [tokenizer.boi_id]]], add_eos=False))
        expected = model.image.unpatchify(model.image.proj_out(last).view(1, 16, -1)).clamp(-1, 1)
    torch.testing.assert_close(stream[-1].outputs[1][0], expected[0])
    with pytest.raises(ValueError, match="image_steps do not apply to the 'one-shot' image interface"):
        engine.generate([[tokenizer.encode("two")]], GenerationOptions(image_steps=3))


@pytest.mark.parametrize("case, option", [("discrete", {"cache_threshold": 0.1}), ("discrete", {"sampler": "heun"}),
                                          ("mar", {"image_top_k": 4}), ("diffusion-vae", {"image_top_k": 4})])
def test_an_option_the_interface_does_not_take_is_an_error(case, option, tokenizer):
    model = make(case, len(tokenizer))
    engine = Engine(model, builder_for(model, tokenizer))
    with pytest.raises(ValueError, match=f"{next(iter(option))} do not apply to the '{model.image.name}'"):
        engine.generate([[tokenizer.encode("two")]], GenerationOptions(**option), force_image=True)


def test_options_that_would_do_nothing_are_errors(tokenizer):
    codes = make("discrete", len(tokenizer))
    with pytest.raises(ValueError, match="classifier-free guidance with its scale only"):
        codes.image.options(GenerationOptions(guidance=Guidance(scale=2.0, kind="apg")))
    assert codes.image.options(GenerationOptions(guidance=2.0)).guidance.scale == 2.0
    hybrid = make("hybrid", len(tokenizer))  # the residual head takes the whole Guidance
    assert hybrid.image.options(GenerationOptions(guidance=Guidance(scale=2.0, rescale=0.5))).guidance.rescale == 0.5
    latents = make("diffusion-vae", len(tokenizer))
    with pytest.raises(ValueError, match="'euler' is deterministic"):
        latents.image.options(GenerationOptions(sampler="euler", eta=0.5))
    assert latents.image.options(GenerationOptions(sampler="ddim", eta=0.5, noise="iid")).eta == 0.5
