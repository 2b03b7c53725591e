"""Training configs: files, typed overrides, named configs, --help, and errors for mistyped keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from train_helpers import REPO, subprocess_env

from mmgen.errors import ConfigError
from mmgen.train.config import DEFAULT_CONFIG, TrainConfig, help_text, load_config, named_configs, resolve_model
from mmgen.train.entrypoint import main, parse_argv
from mmgen.train.overrides import build, to_dict
from mmgen.train.tokenizer import trains_image_tokenizer


def test_the_default_job_is_the_bundled_digits_config():
    cfg = load_config(None)
    assert DEFAULT_CONFIG in named_configs()
    assert cfg.out == "runs/digits-tiny" and cfg.model.preset == "tiny"
    assert [s.kind for s in cfg.data.sources] == ["digits"] and cfg.data.sources[0].split == "train"
    assert (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr, cfg.optim.betas) == (3000, 64, 2e-3, (0.9, 0.98))
    model, _ = resolve_model(cfg.model)
    assert model.diffusion.objective == "flow" and model.backbone.hidden_size == 192
    assert model.image.tokens_per_image == 16
    assert (model.image.patch_encoder, model.image.unet_skips, model.diffusion.max_t_when_conditioning) == \
        ("unet", False, 0.25)  # the recipe README measures (captions 97.3-98.7% over three seeds)


def test_the_image_folder_config_trains_its_vae_first():
    cfg = load_config(str(REPO / "configs" / "image-folder.yaml"))
    model, _ = resolve_model(cfg.model)
    assert trains_image_tokenizer(cfg.model, model.image.tokenizer)  # the recipe docs/emoji.md measures
    assert (model.image.tokenizer.kind, model.image.tokenizer.grid, model.image.tokens_per_image) == ("vae", 8, 64)
    assert (model.backbone.image_positions, model.diffusion.t_sampling) == ("2d", "logit_normal")
    assert cfg.image_tokenizer.steps == 3000


def test_named_config_is_found_from_any_directory(tmp_path):
    code = "from mmgen.train.config import load_config; print(load_config('digits-tiny').train.steps)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "3000", out.stderr


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_file_then_typed_overrides(tmp_path, suffix):
    raw = {"out": "x", "optim": {"lr": "1e-3"}, "model": {"backbone": {"num_hidden_layers": 2}},
           "data": {"sources": [{"kind": "digits"}, {"kind": "shapes", "weight": 3}]}}
    path = tmp_path / f"c.{suffix}"
    path.write_text(yaml.safe_dump(raw) if suffix == "yaml" else json.dumps(raw))
    cfg = load_config(str(path), [("optim.warmup_steps", "7"), ("train.mixed_precision", "bf16"),
                                  ("log.progress", "false"), ("data.sources.1.size", "50"),
                                  ("model.backbone.hidden_size", "96"), ("samples.prompts", "[a cat, a dog]"),
                                  ("optim.betas", "[0.9, 0.95]")])
    assert cfg.optim.lr == 1e-3 and cfg.optim.warmup_steps == 7 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.mixed_precision == "bf16" and cfg.log.progress is False
    assert cfg.data.sources[1].size == 50 and cfg.data.sources[1].weight == 3.0
    assert cfg.samples.prompts == ["a cat", "a dog"]
    model, _ = resolve_model(cfg.model)
    assert (model.backbone.hidden_size, model.backbone.num_hidden_layers) == (96, 2)
    assert model.backbone.head_dim == 24  # derived from the overridden width, not the preset's 48
    assert build(TrainConfig, to_dict(cfg)) == cfg  # round trip


@pytest.mark.parametrize("overrides, message", [
    ([("optim.lrr", "1")], "unknown config key 'optim.lrr'; did you mean 'lr'?"),
    ([("trian.steps", "1")], "unknown config key 'trian'; did you mean 'train'?"),
    ([("model.backbone.hiden_size", "64")], "unknown config key 'model.backbone.hiden_size'; did you mean 'hidden_size'?"),
    ([("model.image.tokenizer.resolutoin", "64")], "'model.image.tokenizer.resolutoin'; did you mean 'resolution'?"),
    ([("data.sources.0.knd", "text")], "unknown config key 'data.sources.0.knd'; did you mean 'kind'?"),
    ([("train.steps", "many")], "train.steps must be an integer, got 'many'"),
    ([("optim.lr", "fast")], "optim.lr must be a number"),
    ([("log.progress", "maybe")], "log.progress must be true or false"),
    ([("data.sources.3.path", "x")], "is a list of 1"),
    ([("model.preset", "huge")], "unknown model preset 'huge'"),
    ([("data.sources.0.kind", "imagefolder")], "did you mean 'image_folder'?"),
    ([("data.sources.0.kind", "text")], "a 'text' source needs a path"),
    ([("train.mixed_precision", "fp8")], "mixed_precision must be no, bf16 or fp16"),
    ([("model.image.interface", "discrete")], "needs a discrete (vq or hybrid)"),
])
def test_mistakes_are_errors_that_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def trained_tokenizer_stand_in(path, **fields) -> str:
    """An untrained image tokenizer directory, as `mmgen train-tokenizer` writes one."""
    from mmgen.config import ImageTokenizerConfig
    from mmgen.tokenizers.image import build_image_tokenizer

    build_image_tokenizer(ImageTokenizerConfig(width=8, **fields)).save_pretrained(path)
    return str(path)


def test_a_trained_image_tokenizer_sets_the_tokens_and_must_take_the_configs_images(tmp_path):
    vq = trained_tokenizer_stand_in(tmp_path / "vq", kind="vq", downsample=2, latent_channels=4, codebook_size=16)
    vae = trained_tokenizer_stand_in(tmp_path / "vae", kind="vae", downsample=4, latent_channels=2)
    rgb = trained_tokenizer_stand_in(tmp_path / "rgb", kind="vae", channels=3, resolution=16, downsample=2,
                                     latent_channels=2)

    def image(overrides):
        model, tokenizer = resolve_model(load_config("digits-tiny", overrides).model, load_weights=True)
        return model.image, tokenizer

    img, tokenizer = image({"model.image_tokenizer": vq, "model.image.interface": "discrete"})
    assert (img.tokenizer.kind, img.patch_size, img.tokens_per_image) == ("vq", 1, 16)  # codes: one per token
    assert tokenizer.config == img.tokenizer
    img, _ = image({"model.image_tokenizer": vae})
    assert (img.patch_size, img.tokens_per_image) == (1, 4)  # a 2×2 latent grid: 1×1 patches
    assert image({"model.image_tokenizer": vae, "model.image.patch_size": 2})[0].tokens_per_image == 1
    assert image({})[0].patch_size == 2 and image({"model.image.interface": "mar"})[0].head.width == 128
    with pytest.raises(ConfigError, match=r"takes 3×16² images, this config's images are 1×8²"):
        load_config("digits-tiny", {"model.image_tokenizer": rgb})
    fits = load_config("digits-tiny", {"model.image_tokenizer": rgb, "model.image.tokenizer.channels": "3",
                                       "model.image.tokenizer.resolution": 16})
    assert resolve_model(fits.model)[0].image.tokens_per_image == 16  # an 8×8 latent grid in 2×2 patches
    stated = {"model.image_tokenizer": vq, "model.image.interface": "discrete", "model.image.tokenizer.kind": "vae",
              "model.image.tokenizer.latent_channels": 8}  # the tokenizer a run would train when none is named
    assert resolve_model(load_config("digits-tiny", stated).model)[0].image.tokenizer.latent_channels == 4  # vq's
    folder = load_config(str(REPO / "configs" / "image-folder.yaml"), {"model.image_tokenizer": rgb,
                                                                          "model.image.tokenizer.resolution": 16})
    assert resolve_model(folder.model)[0].image.tokenizer.latent_channels == 2  # rgb's, not the config's VAE's
    with pytest.raises(ConfigError, match="model.image: the 'discrete' interface"):
        load_config("digits-tiny", {"model.image_tokenizer": vae, "model.image.interface": "discrete"})


def test_grid_and_evaluation_options_are_checked_against_the_interface_at_load_time(tmp_path):
    vq = trained_tokenizer_stand_in(tmp_path / "vq", kind="vq", downsample=2, latent_channels=4, codebook_size=16)
    codes = {"model.image_tokenizer": vq, "model.image.interface": "discrete"}
    load_config("digits-tiny", codes)  # the defaults (the interface's own steps) fit every interface
    for section in ("samples", "eval"):
        with pytest.raises(ConfigError, match=f"{section}: option\\(s\\) image_steps do not apply to the 'discrete'"):
            load_config("digits-tiny", {**codes, f"{section}.image_steps": 10})


def test_overrides_in_code_are_a_mapping_checked_like_the_command_line():
    cfg = load_config("digits-tiny", {"train.steps": 7, "optim.lr": "1e-3", "model.image_tokenizer": None})
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.image_tokenizer) == (7, 1e-3, None)
    with pytest.raises(ConfigError, match=r"train.steps must be an integer, got 'x' \(config .* and overrides\)"):
        load_config("digits-tiny", {"train.steps": "x"})


def test_mistyped_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'optim.learning_rate'.*{path}"):
        load_config(str(path))
    path.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="neither a file nor a named config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_argv_forms():
    assert parse_argv(["c.yaml", "--a.b=1", "--c", "2", "--flag", "--resume"]) == (
        "c.yaml", [("a.b", "1"), ("c", "2"), ("flag", "true"), ("resume", "latest")], set())
    assert parse_argv(["--resume", str(REPO), "--print-config"]) == (None, [("resume", str(REPO))], {"print-config"})
    assert parse_argv(["--train-steps", "5", "--objective=eps"])[1] == [("train.steps", "5"),
                                                                         ("model.diffusion.objective", "eps")]
    with pytest.raises(ConfigError, match="two configs"):
        parse_argv(["a.yaml", "b.yaml"])


def test_help_explains_every_key(capsys):
    assert main(["--help"]) is None
    out = capsys.readouterr().out
    assert "usage: mmgen train" in out and "digits-tiny" in out
    for key in ("--optim.lr=FLOAT", "--train.grad_accum=INT", "--checkpoint.keep=INT", "--data.sources.N.kind=STR",
                "--model.backbone.hidden_size=INT", "--model.image.tokenizer.resolution=INT",
                "--model.diffusion.z_loss=FLOAT", "--samples.prompts=LIST", "--resume=STR|null"):
        assert key in out, key
    lines = help_text().splitlines()
    undocumented = [a for a, b in zip(lines, lines[1:] + [""]) if a.startswith("  --") and not b.startswith("        ")]
    assert not undocumented


def test_cli_errors_are_one_line_without_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--optim.lrr=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'optim.lrr'; did you mean 'lr'?") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_print_config_is_loadable_yaml(capsys, tmp_path):
    main(["--print-config", "--train.steps=5"])
    path = tmp_path / "c.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_config(str(path)).train.steps == 5


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + sorted(
    (REPO / "mmgen" / "train" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(str(path))
    assert cfg.data.sources and resolve_model(cfg.model)[0]


def test_fsdp_config_wraps_the_decoder_layer():
    from mmgen import backbone

    fsdp = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert isinstance(getattr(backbone, fsdp["fsdp_transformer_layer_cls_to_wrap"]), type)
