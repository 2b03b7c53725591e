import json
import sys

import pytest
import torch

from mmgen.config import ImageTokenizerConfig
from mmgen.data.image_sets import load_images
from mmgen.metrics import code_statistics
from mmgen.tokenizers.image import ImageTokens, build_image_tokenizer, load_image_tokenizer
from mmgen.train.tokenizer import train_image_tokenizer

K = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions run fastest on one thread; with the CPU shared, two threads each can be 10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(kind: str, **kw) -> ImageTokenizerConfig:
    base = dict(kind=kind, channels=3, resolution=16, latent_channels=4, downsample=4, width=8, res_blocks=1,
                codebook_size=0 if kind == "vae" else K)
    return ImageTokenizerConfig(**{**base, **kw})


def images(n: int = 6, c: int = 3, r: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, r, r, generator=g) * 2 - 1


def calibrated(kind: str):
    torch.manual_seed(0)
    tok = build_image_tokenizer(config(kind)).eval()
    tok.calibrate(images(16, seed=1))
    return tok


@pytest.mark.parametrize("kind", ["vae", "vq", "hybrid"])
def test_encode_decode_shapes_dtypes_and_code_range(kind):
    tok = calibrated(kind)
    x = images()
    with torch.no_grad():
        t = tok.encode(x)
        y = tok.decode(t)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert len(t) == 6
    if kind in ("vq", "hybrid"):
        assert t.codes.shape == (6, 4, 4) and t.codes.dtype == torch.int64
        assert 0 <= int(t.codes.min()) and int(t.codes.max()) < K
        assert tok.dequantize(t.codes).shape == (6, 4, 4, 4)
    else:
        assert t.codes is None
    if kind == "vq":
        assert t.latents is None
    else:
        assert t.latents.shape == (6, 4, 4, 4) and t.latents.dtype == torch.float32
    if kind == "vae":  # calibration: latents of the calibration data have mean 0 and std 1
        lat = tok.encode(images(16, seed=1)).latents
        assert abs(float(lat.detach().mean())) < 1e-4 and abs(float(lat.detach().std()) - 1) < 1e-4


@pytest.mark.parametrize("kind", ["vae", "vq", "hybrid"])
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path):
    tok = calibrated(kind)
    tok.save_pretrained(tmp_path)
    again = load_image_tokenizer(tmp_path)
    assert again.config == tok.config and type(again) is type(tok)
    x = images()
    with torch.no_grad():
        a, b = tok.encode(x), again.encode(x)
        for f in ("codes", "latents"):
            if getattr(a, f) is not None:
                assert torch.equal(getattr(a, f), getattr(b, f))
        assert torch.equal(tok.decode(a), again.decode(b))
    assert not (tmp_path / "model.safetensors.tmp").exists()


def test_hybrid_residual_is_exact():
    tok = calibrated("hybrid")
    assert tok.config.latent_shift == 0.0 and tok.config.latent_scale != 1.0  # measured, not the default
    x = images()
    with torch.no_grad():
        z = tok.latent(x)
        t = tok.encode(x)
        residual = t.latents / tok.config.latent_scale
        torch.testing.assert_close(tok.dequantize(t.codes) + residual, z, atol=1e-6, rtol=0)
        assert float(residual.abs().max()) > 1e-3  # the residual is not trivially zero
        torch.testing.assert_close(tok.decode(t), tok.decoder(z), atol=1e-5, rtol=0)
        vq_only = tok.decode(ImageTokens(codes=t.codes))
        torch.testing.assert_close(vq_only, tok.decoder(tok.dequantize(t.codes)))
        assert not torch.allclose(vq_only, tok.decode(t))


def test_vq_restarts_revive_a_collapsed_codebook():
    torch.manual_seed(0)
    tok = build_image_tokenizer(config("vq")).train()
    x = images(16)
    with torch.no_grad():
        z = tok.latent(x)
        q = tok.quantizer
        q.codebook.data[:] = 100.0  # every code far away ...
        q.codebook.data[0] = z.mean((0, 2, 3))  # ... but one: all cells pick code 0
    usage_before, _ = code_statistics(tok.encode(x).codes, K)
    assert float(usage_before) == 1 / K
    for step in range(q.dead_after + 1):  # restarts happen once codes stay unused for dead_after steps
        with torch.no_grad():
            parts = tok.loss(x, step)
    assert float(parts["restarted"]) == K - 1  # at step dead_after, every unused code moved
    usage_after, perplexity = code_statistics(tok.encode(x).codes, K)
    assert float(usage_after) > 0.3 and float(perplexity) > 5


@pytest.mark.parametrize("kind", ["vq", "hybrid", "vae"])
def test_short_training_lowers_the_loss_and_writes_a_usable_directory(kind, tmp_path):
    data = load_images("digits", "train", limit=256)
    held = load_images("digits", "test", limit=16)
    cfg = ImageTokenizerConfig(kind=kind, channels=1, resolution=8, latent_channels=4, downsample=2, width=16,
                               codebook_size=0 if kind == "vae" else 64)
    tok, log = train_image_tokenizer(cfg, data, tmp_path, steps=60, batch_size=32, lr=3e-3, progress=False,
                                     eval_images=held, save_every=30, log_every=10, warmup=5)
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], [r["loss"] for r in log]
    assert cfg.latent_scale == 1.0  # the caller's config is not mutated
    for name in ("config.json", "model.safetensors", "reconstructions.png", "train_log.jsonl", "train_summary.json"):
        assert (tmp_path / name).is_file()
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps"] == 60 and summary["held_out_psnr"] > 10
    if kind != "vae":
        assert "perplexity" in log[-1] and 0 < summary["usage"] <= 1
    loaded = load_image_tokenizer(tmp_path)
    assert loaded.config == tok.config
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(held)), tok.decode(tok.encode(held)))


def test_training_stops_at_the_time_budget(tmp_path):
    cfg = ImageTokenizerConfig(kind="vae", channels=1, resolution=8, latent_channels=4, downsample=2, width=8)
    from mmgen.data.digits import DigitsDataset

    # a Dataset of (image, caption) pairs works as well as a tensor of images
    _, log = train_image_tokenizer(cfg, DigitsDataset("test"), tmp_path, steps=10_000, batch_size=8,
                                   max_minutes=0.02, progress=False)
    assert log[-1]["step"] < 10_000 and (tmp_path / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["vae", "vq", "hybrid"])
@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 1, 16, 16), r"\(1, 16, 16\).*\(3, 16, 16\)"),  # wrong channels
        (torch.rand(2, 3, 8, 8), r"\(3, 8, 8\).*\(3, 16, 16\)"),  # wrong size
        (torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), "floating point"),  # wrong dtype
        (torch.rand(3, 16, 16), r"image batch \(N, 3, 16, 16\)"),  # no batch dimension
    ],
)
def test_bad_images_are_named(kind, bad, match):
    tok = build_image_tokenizer(config(kind))
    with pytest.raises(ValueError, match=match):
        tok.encode(bad)


def test_bad_tokens_are_named():
    vq, vae = build_image_tokenizer(config("vq")), build_image_tokenizer(config("vae"))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vq.decode(ImageTokens(codes=torch.full((1, 4, 4), K)))
    with pytest.raises(ValueError, match=r"\(N, 4, 4\)"):
        vq.decode(ImageTokens(codes=torch.zeros(1, 8, 8, dtype=torch.long)))
    with pytest.raises(ValueError, match="codes is None"):
        vq.decode(ImageTokens(latents=torch.zeros(1, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"\(N, 4, 4, 4\)"):
        vae.decode(ImageTokens(latents=torch.zeros(1, 3, 4, 4)))


def test_a_tokenizer_directory_whose_config_does_not_match_is_named(tmp_path):
    build_image_tokenizer(config("vq")).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "codebook_size": 64}))
    with pytest.raises(ValueError, match=r"does not match.*quantizer.codebook: file \(32, 4\) vs config \(64, 4\)"):
        load_image_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "kind": "vae", "codebook_size": 0}))
    with pytest.raises(ValueError, match="does not match"):
        load_image_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not trainable"):
        train_image_tokenizer(ImageTokenizerConfig(), images(4, 1, 8), tmp_path / "px", steps=1, progress=False)


def test_image_folder_skips_unreadable_files_with_a_count(tmp_path):
    from PIL import Image

    for i in range(12):
        Image.new("RGB", (40 + i, 30), (10 * i, 100, 200)).save(tmp_path / f"im{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\).*broken.jpg"):
        train = load_images(str(tmp_path), "train", resolution=16)
    test = load_images(str(tmp_path), "test", resolution=16)
    assert train.shape[1:] == (3, 16, 16) and len(train) + len(test) == 12
    assert train.min() >= -1 and train.max() <= 1
    with pytest.raises(FileNotFoundError, match="neither 'digits', 'shapes' nor a directory"):
        load_images(str(tmp_path / "nope"))


# -- diffusers AutoencoderKL --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_autoencoder_kl(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return vae.eval(), path


def test_diffusers_vae_loads_from_a_local_directory(tiny_autoencoder_kl, tmp_path):
    vae, path = tiny_autoencoder_kl
    cfg = ImageTokenizerConfig(kind="diffusers", channels=3, resolution=16, latent_channels=4, downsample=2,
                               path=str(path))
    tok = build_image_tokenizer(cfg)
    assert (tok.config.latent_scale, tok.config.latent_shift) == (0.5, 0.1)  # from the VAE's config
    x = images()
    with torch.no_grad():
        t = tok.encode(x)
        expected = (vae.encode(x).latent_dist.mean - 0.1) * 0.5
        torch.testing.assert_close(t.latents, expected)
        assert t.latents.shape == (6, 4, 8, 8)
        y = tok.decode(t)
        torch.testing.assert_close(y, vae.decode(vae.encode(x).latent_dist.mean).sample)
    tok.to(torch.bfloat16)  # the VAE stays in float32 whatever the surrounding model is cast to
    assert all(p.dtype == torch.float32 for p in tok.vae.parameters())
    tok.save_pretrained(tmp_path)
    again = load_image_tokenizer(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x).latents, t.latents)
    explicit = ImageTokenizerConfig(**{**cfg.__dict__, "latent_scale": 2.0, "latent_shift": 0.0})
    assert build_image_tokenizer(explicit).config.latent_scale == 2.0  # an explicit scale is kept


def test_diffusers_vae_errors_name_the_problem(tiny_autoencoder_kl, tmp_path, monkeypatch):
    _, path = tiny_autoencoder_kl
    with pytest.raises(ValueError, match=r"'latent_channels': \(8, 4\)"):
        build_image_tokenizer(ImageTokenizerConfig(kind="diffusers", channels=3, resolution=16, latent_channels=8,
                                                   downsample=2, path=str(path)))
    with pytest.raises(FileNotFoundError, match="AutoencoderKL.save_pretrained"):
        build_image_tokenizer(ImageTokenizerConfig(kind="diffusers", channels=3, resolution=16, latent_channels=4,
                                                   downsample=2, path=str(tmp_path)))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if diffusers were not installed
    with pytest.raises(ImportError, match=r'pip install "mmgen\[diffusers\]"'):
        build_image_tokenizer(ImageTokenizerConfig(kind="diffusers", channels=3, resolution=16, latent_channels=4,
                                                   downsample=2, path=str(path)))
