"""The U-Net patch encoder / decoder of the diffusion interface (`image.patch_encoder = "unet"`)."""

import dataclasses

import pytest
import torch
from conftest import digit, micro_config
from test_generation import OPTS, denoised_cached_and_uncached
from test_image_positions import assert_same
from test_interfaces import assert_causal_interfaces_refuse
from train_helpers import MICRO_MODEL, restore_threads  # noqa: F401 (autouse fixture)
from train_helpers import micro_config as train_config

from mmgen.config import ImageConfig, ImageTokenizerConfig
from mmgen.errors import ConfigError
from mmgen.generation import Engine
from mmgen.heads.unet import UNetPatches
from mmgen.model import MMGenModel
from mmgen.train.config import TrainConfig
from mmgen.train.overrides import build
from mmgen.train.tracking import read_log
from mmgen.train.trainer import Trainer


@pytest.fixture
def unet_model(tokenizer) -> MMGenModel:
    torch.manual_seed(0)
    cfg = micro_config(len(tokenizer), objective="flow")
    cfg.image = dataclasses.replace(cfg.image, patch_encoder="unet", unet_channels=8)
    m = MMGenModel(cfg)
    with torch.no_grad():  # an untrained model predicts zeros: make its outputs depend on its inputs
        m.image.unet.conv_out.weight.normal_(0, 0.02)
    return m.eval()


def test_shapes_levels_and_zero_start():
    unet = UNetPatches(latent_channels=3, patch_size=4, hidden_size=24, channels=8)
    unet.init_weights()
    x, time = torch.randn(2, 3, 16, 16), torch.randn(2, 24)
    tokens, skips = unet.encode(x, time)
    assert tokens.shape == (2, 16, 24)  # (16 / 4)² tokens
    assert [s.shape[1:] for s in skips] == [(8, 16, 16), (16, 8, 8), (32, 4, 4)]
    assert torch.equal(unet.decode(tokens, time, skips), torch.zeros(2, 3, 16, 16))
    one = UNetPatches(latent_channels=1, patch_size=1, hidden_size=24, channels=8)  # no halving: one level
    assert one.encode(torch.randn(1, 1, 8, 8), time[:1])[0].shape == (1, 64, 24)


def test_without_skips_the_decoder_sees_only_the_tokens():
    """With skips the prediction moves with the noisy input even when the backbone's hidden states are held
    fixed (the path around the backbone); without them it cannot."""
    torch.manual_seed(0)
    x, y, time, hidden = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 24), torch.randn(2, 16, 24)
    moved = {}
    for skips in (True, False):
        unet = UNetPatches(latent_channels=3, patch_size=4, hidden_size=24, channels=8, skips=skips)
        with torch.no_grad():
            unet.conv_out.weight.normal_(0, 0.02)
            tokens, kept = unet.encode(x, time)
            assert tokens.shape == (2, 16, 24) and len(kept) == (3 if skips else 0)
            out = unet.decode(hidden, time, kept)
            assert out.shape == (2, 3, 16, 16) and out.abs().amax() > 0
            moved[skips] = (out - unet.decode(hidden, time, unet.encode(y, time)[1])).abs().amax().item()
    assert moved[True] > 1e-3 and moved[False] == 0


def test_a_token_sees_the_pixels_around_its_patch():
    """Unlike the linear layer, a token depends on pixels outside its patch (the convolutions' reach;
    GroupNorm's statistics reach every token a little)."""
    torch.manual_seed(0)
    unet = UNetPatches(latent_channels=1, patch_size=2, hidden_size=16, channels=4)
    x, time = torch.randn(1, 1, 16, 16), torch.randn(1, 16)
    y = x.clone()
    y[0, 0, 0, 2] += 1.0  # a pixel of token 1 (row 0, columns 2-3), next to token 0
    change = (unet.encode(x, time)[0] - unet.encode(y, time)[0]).abs().amax(-1)[0]  # (64,)
    assert change[0] > 10 * change[63] and change[1] > 10 * change[63]  # the neighbour, not a far token


@torch.no_grad()
def test_cached_denoiser_equals_uncached(unet_model, builder, tokenizer):
    got, want, _, _ = denoised_cached_and_uncached(unet_model, builder, tokenizer)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def generate(model, builder, tokenizer) -> list:
    prompts = [[tokenizer.encode("a handwritten digit 7")], [digit(2), tokenizer.encode("this is")]]
    return Engine(model, builder).generate(prompts, OPTS, seed=[11, 12], force_image=[True, False])


def test_save_load_keeps_outputs(unet_model, builder, tokenizer, tmp_path):
    before = generate(unet_model, builder, tokenizer)
    assert isinstance(before[0][0], torch.Tensor)
    unet_model.save_pretrained(tmp_path)
    loaded = MMGenModel.from_pretrained(tmp_path)
    assert loaded.config.image.patch_encoder == "unet" and loaded.config.image.unet_channels == 8
    for a, b in zip(generate(loaded, builder, tokenizer), before, strict=True):
        assert_same(a, b, atol=0)


@pytest.mark.parametrize("skips", [True, False])
def test_a_training_run_lowers_the_image_loss(tmp_path, tokenizer, skips):
    tokenizer.save(tmp_path)
    model = {**MICRO_MODEL, "image": {"patch_encoder": "unet", "unet_channels": 8, "unet_skips": skips}}
    cfg = train_config(tmp_path / "run", tmp_path, model=model, train={"steps": 30, "batch_size": 16},
                       optim={"lr": 3e-3, "warmup_steps": 2}, checkpoint={"every": 0}, log={"every": 1})
    log = read_log(Trainer(build(TrainConfig, cfg)).fit())
    first, last = sum(r["image"] for r in log[:5]) / 5, sum(r["image"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    image = MMGenModel.from_pretrained(tmp_path / "run").config.image
    assert image.patch_encoder == "unet" and image.unet_skips == skips


def test_config_errors(tokenizer):
    pixels = ImageTokenizerConfig(kind="pixels", channels=3, latent_channels=3, resolution=24)
    with pytest.raises(ConfigError, match="patch_size must be a power of two .* got 3"):
        ImageConfig(tokenizer=pixels, patch_size=3, patch_encoder="unet")
    with pytest.raises(ConfigError, match="patch_encoder"):
        ImageConfig(patch_encoder="conv")
    assert_causal_interfaces_refuse(tokenizer, lambda cfg: setattr(cfg.image, "patch_encoder", "unet"),
                                    "applies to the 'diffusion' interface .* the '{case}' interface")
