import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen.cli import main
from mmgen.compare import bits_per_image, render_markdown
from mmgen.config import ImageTokenizerConfig
from mmgen.data.image_sets import load_images
from mmgen.metrics import PSNR_CAP, frechet_wavelet_distance, psnr, ssim
from mmgen.tokenizers.image import build_image_tokenizer
from mmgen.train.tokenizer import train_image_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batch(n=4, c=3, r=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, c, r + 4, r + 4, generator=g), 5, 1)  # (n, c, r, r)
    return smooth * 2 - 1


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """scikit-image's algorithm (gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1), written independently with scipy: filter with 'reflect' padding, crop 5 pixels."""
    from scipy.ndimage import gaussian_filter

    def filt(a):
        return gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def test_psnr_identical_is_capped_and_a_known_offset_is_exact():
    x = batch()
    assert torch.equal(psnr(x, x), torch.full((4,), PSNR_CAP))
    y = (x + 0.2)  # 0.1 on the [0, 1] scale everywhere: PSNR = −20·log10(0.1) = 20 dB
    torch.testing.assert_close(psnr(y, x), torch.full((4,), 20.0))


def test_ssim_matches_the_reference_algorithm_and_known_cases():
    x = batch()
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    ours = ssim(noisy, x)
    a, b = ((noisy.double() + 1) / 2).numpy(), ((x.double() + 1) / 2).numpy()
    ref = [np.mean([reference_ssim(a[i, c], b[i, c]) for c in range(3)]) for i in range(4)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    assert 0.05 < float(ours.mean()) < 0.9
    # constant images: SSIM = (2ab + C1) / (a² + b² + C1)
    p, q = 0.3, 0.6
    const = ssim(torch.full((1, 1, 16, 16), 2 * p - 1), torch.full((1, 1, 16, 16), 2 * q - 1))
    assert math.isclose(float(const), (2 * p * q + 1e-4) / (p * p + q * q + 1e-4), rel_tol=1e-5)
    less = ssim((x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1), x)
    assert (less < ours).all()
    digits = batch(2, 1, 8)  # 8×8 images use a 7×7 window
    torch.testing.assert_close(ssim(digits, digits), torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, x[:, :1])


def test_frechet_wavelet_distance():
    pytest.importorskip("pytorchfwd.freq_math")
    real = batch(64, seed=0)
    assert abs(frechet_wavelet_distance(real, real)) < 1e-6
    g = torch.Generator().manual_seed(2)
    small = frechet_wavelet_distance(real, (real + 0.05 * torch.randn(real.shape, generator=g)).clamp(-1, 1))
    large = frechet_wavelet_distance(real, (real + 0.3 * torch.randn(real.shape, generator=g)).clamp(-1, 1))
    assert 0 < small < large
    assert torch.get_default_dtype() == torch.float32  # pytorchfwd.fwd (not imported) would set float64


def test_bits_per_image_convention():
    def tok(kind, k=0):
        return build_image_tokenizer(ImageTokenizerConfig(kind=kind, channels=1, resolution=8, latent_channels=4,
                                                          downsample=2, width=8, codebook_size=k))

    assert bits_per_image(tok("vq", 64)) == 16 * 6  # 16 tokens × log2 64
    assert bits_per_image(tok("vae")) == 16 * 4 * 16  # 16 cells × 4 channels × fp16
    assert bits_per_image(tok("hybrid", 64)) == 16 * 6 + 16 * 4 * 16


def test_render_markdown_takes_any_columns():
    rows = [{"tokenizer": "a", "psnr": 30.123456, "gen_fid": 1.5}, {"tokenizer": "b", "fwd": None, "params": 123456}]
    md = render_markdown(rows).splitlines()
    assert md[0] == "| tokenizer | psnr | fwd | params | gen_fid |"
    assert md[2] == "| a | 30.12 | – | – | 1.5 |" and md[3] == "| b | – | – | 123,456 | – |"


def test_compare_end_to_end_through_the_cli(tmp_path, capsys):
    vq_dir = tmp_path / "digits-vq"
    torch.manual_seed(0)
    cfg = ImageTokenizerConfig(kind="hybrid", channels=1, resolution=8, latent_channels=4, downsample=2, width=8,
                               codebook_size=16)
    train_image_tokenizer(cfg, load_images("digits", limit=256), vq_dir, steps=40, batch_size=32, lr=3e-3,
                          progress=False, warmup=5)
    out = tmp_path / "results"
    main(["compare-tokenizers", str(vq_dir), "vae", "pixels", "--data", "digits", "--held-out", "48",
          "--steps", "4", "--out", str(out), "--grid", str(tmp_path / "grid.png")])
    printed = capsys.readouterr().out
    assert "| tokenizer | kind |" in printed and "| digits-vq | hybrid |" in printed
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    by = {r["tokenizer"]: r for r in rows}
    assert set(by) == {"digits-vq", "vae", "pixels"}
    assert by["pixels"]["psnr"] == PSNR_CAP and by["pixels"]["ssim"] == 1.0
    assert by["vae"]["train_steps"] == 4 and (out / "vae" / "model.safetensors").is_file()
    h = by["digits-vq"]
    assert h["train_steps"] == 40 and h["tokens_per_image"] == 16 and 0 < h["usage"] <= 1 and h["perplexity"] >= 1
    assert h["psnr"] > h["psnr_codes_only"]  # the residual restores what the codes lose
    for key in ("ssim", "params", "encode_img_s", "decode_img_s", "bits_per_image"):
        assert h[key] is not None and h[key] > 0
    grid = Image.open(tmp_path / "grid.png")  # 8 images × (original, hybrid, hybrid codes, vae, pixels)
    assert grid.size[0] > 5 * 8 * 16 and grid.size[1] > 8 * 8 * 16


def test_train_tokenizer_cli(tmp_path, capsys):
    main(["train-tokenizer", "--kind", "vq", "--data", "digits", "--steps", "3", "--width", "8",
          "--codebook-size", "16", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps"] == 3 and "held_out_psnr" in summary and "usage" in summary
    assert json.loads((tmp_path / "config.json").read_text())["codebook_size"] == 16
    with pytest.raises(SystemExit) as e:
        main(["train-tokenizer", "--kind", "vq", "--data", "digits", "--resolution", "32", "--out", str(tmp_path)])
    assert e.value.code == 2 and "resolution" in capsys.readouterr().err
