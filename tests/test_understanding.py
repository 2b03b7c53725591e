"""Decoupled image input (Janus / ILLUME+): images the model reads enter through the understanding
input (codes, latents before quantization, or a frozen vision encoder); images it writes stay codes.
Cached == uncached with prompt images and the clean pass, training, the encoder's save/load, checks."""

import shutil

import pytest
import torch
from conftest import digit
from test_interfaces import INPUTS, builder_for, make, tiny_vision_dir
from train_helpers import micro_config, restore_threads  # noqa: F401 (autouse fixture)

from mmgen.compare_generation import parse_spec
from mmgen.config import ImageConfig, ModelConfig
from mmgen.errors import ConfigError
from mmgen.model import MMGenModel
from mmgen.train.config import TrainConfig
from mmgen.train.overrides import build
from mmgen.train.trainer import run


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> str:
    return tiny_vision_dir(tmp_path_factory.mktemp("siglip"))


def logits_after(model, cache, ids) -> torch.Tensor:
    """Feed text `ids` one by one to `cache`; the logits after each (len(ids), V)."""
    out = []
    for tid in ids:
        x = model.embed(torch.tensor([[tid]]), torch.tensor([[-1]]), None)
        out.append(model.logits(model.extend(cache, x, torch.tensor([True]), False)[:, -1]))
    return torch.cat(out)


@torch.no_grad()
@pytest.mark.parametrize("understanding", INPUTS)
@pytest.mark.parametrize("case", ["discrete", "hybrid"])
def test_prompt_image_and_clean_pass_cached_equal_uncached(case, understanding, tokenizer, encoder_dir):
    """A prompt image, text, a drawn image committed by the clean pass, more text: the cached logits
    equal one uncached forward; a drawn image is read as if it had been given."""
    model = make(case, len(tokenizer), understanding, encoder_dir)
    builder = builder_for(model, tokenizer)
    given, text, after = digit(3), tokenizer.encode("is a three, and"), tokenizer.encode("a five")
    drawn = model.encode_images(digit(5)[None])  # stands for the tokens the interface drew
    cache, _ = model.prefill(builder([[given, text + [tokenizer.boi_id]]], add_eos=False))
    model.extend(cache, model.embed_drawn(drawn), torch.tensor([True]), True)  # the engine's clean pass
    cached = logits_after(model, cache, [tokenizer.eoi_id] + after)
    b = builder([[given, text, model.decode_images(drawn)[0], after]], add_eos=False)
    slots = torch.cat([model.read_images(b.images[:1]), model.embed_drawn(drawn)])  # (2, L, D)
    hidden, _ = model(model.embed(b.ids, b.image_id, slots), b.positions, b.doc_id, b.image_id)
    torch.testing.assert_close(cached, model.logits(hidden[0, -len(after) - 1 :]), atol=1e-4, rtol=1e-4)
    if understanding != "codes":  # what later text attends to: the drawn image read as a given one
        torch.testing.assert_close(model.embed_drawn(drawn), model.read_images(model.decode_images(drawn)))


@pytest.mark.parametrize("understanding", ["latents", "encoder"])
def test_training_reads_images_before_their_text_and_writes_the_others_as_codes(understanding, tokenizer,
                                                                               encoder_dir):
    model = make("hybrid", len(tokenizer), understanding, encoder_dir)  # eval: codes are not corrupted
    images = torch.stack([digit(i) for i in range(6)])
    conditions = torch.tensor([True, False, True, False, False, True])
    inputs, targets = model.train_image_inputs(images, conditions, None)  # (6, L, D)
    torch.testing.assert_close(inputs[conditions], model.read_images(images[conditions]))
    torch.testing.assert_close(inputs[~conditions], model.image.embed(model.encode_images(images[~conditions])))
    assert torch.equal(targets.codes, model.encode_images(images).codes)  # every image's codes stay the targets
    model.train()
    read_only = model.loss(builder_for(model, tokenizer)([[digit(0), "a zero"]]))
    assert read_only["image_sum"] == 0 and read_only["images"] == 1  # a read image is an input, not a target
    batch = builder_for(model, tokenizer)([[digit(0), "a zero"], ["a one", digit(1)]])
    model.loss(batch, torch.Generator().manual_seed(0))["loss"].backward()
    u = model.image.understanding
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in u.proj.parameters())
    frozen = [p for n, p in u.named_parameters() if not n.startswith("proj.")]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert understanding != "encoder" or not u.encoder.training  # the frozen encoder stays in eval mode


def test_encoder_input_trains_through_the_trainer_and_travels_with_the_model(tokenizer, tmp_path):
    """CLIP (a CLS token before the 8×8 patches, pooled to the 4×4 token grid), frozen and pretrained."""
    from transformers import CLIPVisionModel

    clip_dir = tiny_vision_dir(tmp_path / "clip", "clip")
    pretrained = CLIPVisionModel.from_pretrained(clip_dir).state_dict()
    (tmp_path / "tok").mkdir()
    tokenizer.save(tmp_path / "tok")
    image = {"interface": "discrete", "patch_size": 1, "understanding_input": "encoder",
             "understanding_encoder": clip_dir,
             "tokenizer": {"kind": "vq", "downsample": 2, "latent_channels": 3, "codebook_size": 16, "width": 8}}
    cfg = micro_config(tmp_path / "run", tmp_path / "tok", image_tokenizer={"steps": 2, "max_images": 32})
    cfg["model"]["image"] = image  # the VQ is trained first, 2 steps on 32 digits
    out = run(build(TrainConfig, cfg))
    shutil.rmtree(clip_dir)  # the model directory carries the encoder: its config file and its weights
    trained = MMGenModel.from_pretrained(out)
    assert trained.config.image.understanding_encoder == str(out / "understanding_encoder.json")
    for name, value in trained.image.understanding.encoder.state_dict().items():
        torch.testing.assert_close(value, pretrained[name], msg=f"{name} changed")  # frozen, not re-initialized
    assert trained.image.understanding.proj[0].weight.std() > 0
    images = torch.stack([digit(i) for i in range(3)])
    assert trained.read_images(images).shape == (3, 16, 48)  # one token per cell of the 4×4 grid


def test_understanding_input_checks():
    vq = make("discrete", 512).config.image.tokenizer
    with pytest.raises(ConfigError, match="needs image.understanding_encoder: pass the local directory"):
        MMGenModel(ModelConfig(image=ImageConfig("discrete", vq, patch_size=1, understanding_input="encoder")))
    with pytest.raises(ConfigError, match="understanding_encoder = '/nowhere' does not exist"):
        MMGenModel(ModelConfig(image=ImageConfig("discrete", vq, patch_size=1, understanding_input="encoder",
                                                 understanding_encoder="/nowhere")))
    with pytest.raises(ConfigError, match=r"the 'diffusion' interface takes 'codes'"):
        MMGenModel(ModelConfig(image=ImageConfig(understanding_input="latents")))
    with pytest.raises(ConfigError, match=r"image.understanding_input = 'pixels'.*'codes', 'latents', 'encoder'"):
        MMGenModel(ModelConfig(image=ImageConfig("discrete", vq, patch_size=1, understanding_input="pixels")))
    assert parse_spec("pixels:mar+latents") == ("pixels", None, "mar", "latents")
    assert parse_spec("pixels") == ("pixels", None, "diffusion", "codes")


def test_code_input_noise_corrupts_drawn_images_inputs_in_training_only(tokenizer):
    """Noisy teacher forcing: with image.code_input_noise the input codes of drawn (text-first) images
    are partly random in training, the targets stay the true codes, and eval inputs stay clean."""
    model = make("discrete", len(tokenizer), "latents")
    model.image.input_noise = 1.0  # rate uniform in [0, 1]: some codes swapped in almost every image
    images = torch.stack([digit(i % 10) for i in range(8)])
    drawn = torch.zeros(8, dtype=torch.bool)
    tokens = model.encode_images(images)
    clean = model.image.code_embed(tokens.codes.flatten(1))
    inputs, targets = model.image.train_inputs(tokens, drawn, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, clean)  # eval mode: clean
    model.train()
    inputs, targets = model.image.train_inputs(tokens, drawn, torch.Generator().manual_seed(0))
    changed = (inputs != clean).any(-1)  # (8, L)
    assert 0 < changed.float().mean() < 1 and torch.equal(targets.codes, tokens.codes)
    model.image.input_noise = 0.0
    inputs, _ = model.image.train_inputs(tokens, drawn, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, clean)  # the default: drawn images are teacher-forced with clean codes
    assert make("discrete", len(tokenizer), "latents").image.input_noise == 0.2  # the default reading latents
    assert make("discrete", len(tokenizer)).image.input_noise == 0.0  # codes read as codes: already corrupted
    with pytest.raises(ValueError, match="code_input_noise = 0.1: the 'diffusion' interface has no input codes"):
        MMGenModel(ModelConfig(image=ImageConfig(code_input_noise=0.1)))
