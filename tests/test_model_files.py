"""Broken model and tokenizer directories: each failure is a `ModelFileError` (or FileNotFoundError for a
missing file) naming the file and the field or tensors, and a good directory still loads afterwards.
The config loader takes arbitrary JSON without any error but mmgen's own (a hypothesis property)."""

import dataclasses
import io
import json
import pickle
import shutil

import pytest
import sentencepiece as spm
import torch
from conftest import micro_config
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mmgen.assets import DEFAULT_MODEL
from mmgen.config import ImageTokenizerConfig, ModelConfig
from mmgen.config_check import build
from mmgen.errors import InputError, MMGenError, ModelFileError
from mmgen.files import read_json_object
from mmgen.model import MMGenModel
from mmgen.pipeline import Pipeline
from mmgen.tokenizers.image import build_image_tokenizer, load_image_tokenizer
from mmgen.tokenizers.text import TextTokenizer

GOOD_CONFIG = json.loads((DEFAULT_MODEL / "config.json").read_text())


@pytest.fixture
def model_dir(tmp_path):
    """A copy of the bundled model (config.json, model.safetensors, tokenizer.model) to break."""
    return shutil.copytree(DEFAULT_MODEL, tmp_path / "model")


def still_loads() -> None:
    """A good directory loads after a failed one (nothing global was left half-done)."""
    assert len(Pipeline.from_pretrained(DEFAULT_MODEL).tokenizer) == GOOD_CONFIG["backbone"]["vocab_size"]


def edit_config(directory, path: str, value) -> None:
    """Set the dotted `path` of directory/config.json to `value`."""
    cfg = json.loads((directory / "config.json").read_text())
    *sections, key = path.split(".")
    node = cfg
    for s in sections:
        node = node[s]
    node[key] = value
    (directory / "config.json").write_text(json.dumps(cfg))


# -- model.safetensors ------------------------------------------------------------------------------


def _pickle(data: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("damage, match", [
    (lambda b: b"", "is empty"),
    (lambda b: b[: len(b) // 2], r"is truncated: it holds \d+ bytes, its header describes \d+"),
    (lambda b: b[:100], "is truncated"),
    (lambda b: b + b"junk", "has 4 bytes after its last tensor"),
    (_pickle, "is a pickle"),
    (lambda b: pickle.dumps({"w": [1.0]}), "is a pickle"),
    (lambda b: b'{"backbone": {}}', "holds JSON text"),
    (lambda b: bytes(range(256)) * 4, "is not a safetensors file"),
])
def test_corrupt_weights_are_named(model_dir, damage, match):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelFileError, match=f"model.safetensors {match}.*copy model.safetensors again"):
        Pipeline.from_pretrained(model_dir)
    still_loads()


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({"model.norm.weight": torch.ones(100)}),
     r"tensors differ: model.norm.weight: file \(100,\) vs config \(192,\)"),
    (lambda t: t.pop("model.layers.3.mlp.up_proj.weight"), r"missing from the file: model.layers.3.mlp.up_proj.weight"),
    (lambda t: t.update({"extra.weight": torch.ones(3)}), r"not in the model: extra.weight"),
    (lambda t: t.update({"model.norm.weight": torch.ones(192, dtype=torch.int64)}),
     r"model.norm.weight: file dtype I64 vs config torch.float32"),
])
def test_weights_that_do_not_fit_are_listed(model_dir, edit, match):
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights))
    with pytest.raises(ModelFileError, match=f"model.safetensors does not match .*config.json.*{match}"):
        MMGenModel.from_pretrained(model_dir)
    still_loads()


def test_weights_of_another_architecture_list_the_first_differences(model_dir, tmp_path):
    MMGenModel(micro_config(938)).save_pretrained(tmp_path / "other")  # 2 layers of width 48, another interface
    shutil.copy(tmp_path / "other" / "model.safetensors", model_dir / "model.safetensors")
    with pytest.raises(ModelFileError) as e:
        MMGenModel.from_pretrained(model_dir)
    message = str(e.value)
    assert "tensors differ: model.layers.0.self_attn.q_proj.weight: file (48, 48) vs config (192, 192)" in message
    assert "missing from the file: model.layers.2." in message and "in all)" in message
    assert "Use the config.json saved with these weights" in message


def test_non_finite_weights_are_named(model_dir):
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(ModelFileError, match="model.safetensors holds NaN or infinite values in model.norm.weight"):
        MMGenModel.from_pretrained(model_dir)


def test_a_config_describing_a_much_larger_model_fails_before_building_it(model_dir):
    edit_config(model_dir, "backbone.num_hidden_layers", 10**7)  # would take hours and all memory to build
    with pytest.raises(ModelFileError, match="config.json describes a mmgen model larger than .*model.safetensors"):
        MMGenModel.from_pretrained(model_dir)
    edit_config(model_dir, "backbone.hidden_size", 4 * 10**12)
    with pytest.raises(ModelFileError, match="config.json describes a mmgen model that cannot be built here"):
        MMGenModel.from_pretrained(model_dir)
    still_loads()


# -- config.json ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, value, match", [
    ("backbone.num_hidden_layers", 4.0, r"config.json: backbone.num_hidden_layers = 4.0 \(float\): must be an integer"),
    ("backbone.hidden_size", "192", r'backbone.hidden_size = "192" \(str\): must be an integer'),
    ("backbone.vocab_size", True, r"backbone.vocab_size = true \(bool\): must be an integer"),
    ("backbone.hidden_size", None, r"backbone.hidden_size = null: must be an integer \(the field is not optional\)"),
    ("backbone.rms_norm_eps", "1e-6", r"backbone.rms_norm_eps = \"1e-6\" \(str\): must be a number"),
    ("backbone.rope_theta", float("nan"), r"backbone.rope_theta = NaN \(float\): must be a finite number"),
    ("backbone.tie_word_embeddings", 1, r"backbone.tie_word_embeddings = 1 \(int\): must be true or false"),
    ("image.tokenizer", [3, 16], r"image.tokenizer is a section: give a JSON object of its fields, not \[3, 16\]"),
    ("image.tokenizer.path", 5, r"image.tokenizer.path = 5 \(int\): must be a string"),
    ("backbone.num_hidden_layers", 0, r"backbone: num_hidden_layers = 0: must be an integer in \[1, inf\]"),
    ("backbone.hidden_size", -192, r"backbone: hidden_size = -192: must be an integer in \[1, inf\]"),
    ("backbone.vocab_size", 0, r"backbone: vocab_size = 0: must be an integer in \[1, inf\]"),
    ("backbone.head_dim", 47, r"head_dim = 47: must be even"),
    ("backbone.hiden_size", 3, r"unknown key 'backbone.hiden_size': did you mean 'hidden_size'\?"),
    ("backbon", {}, r"unknown key 'backbon': did you mean 'backbone'\?"),
    ("diffusion.zzz", 1, r"unknown key 'diffusion.zzz': remove it \(the valid keys here are objective, loss_weight"),
    ("image.tokenizer.kind", "jpeg", r"image.tokenizer: unknown image tokenizer kind 'jpeg'"),
    ("image.tokenizer.downsample", 3, r"downsample = 3: must be a power of 2"),
    ("diffusion.max_t_when_conditioning", 2.0, r"max_t_when_conditioning = 2.0: must be a number in \[0, 1\]"),
    ("image.interface", "nope", r"config.json: unknown image interface 'nope'"),
])
def test_bad_config_values_name_the_field(model_dir, path, value, match):
    edit_config(model_dir, path, value)
    with pytest.raises(ModelFileError, match=match):
        Pipeline.from_pretrained(model_dir)
    still_loads()


@pytest.mark.parametrize("content, match", [
    (b'{"backbone": ', r"is not valid JSON: Expecting value at line 1, column 14"),
    (b"\xff\xfe{}", r"is not UTF-8 text \(byte 0 is invalid\)"),
    (b"[1, 2]", r"holds a JSON list, not an object of config fields"),
    (b"3", r"holds a JSON int, not an object"),
    (b"  \n", r"is empty"),
    pytest.param(b"[" * 100_000, r"is not a config: its JSON is nested too deeply", id="deep"),
])
def test_a_config_that_is_not_a_json_object_is_named(model_dir, content, match):
    (model_dir / "config.json").write_bytes(content)
    with pytest.raises(ModelFileError, match=f"config.json {match}"):
        MMGenModel.from_pretrained(model_dir)
    still_loads()


def test_model_config_load_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GOOD_CONFIG, "backbone": {**GOOD_CONFIG["backbone"], "num_hidden_layers": 4.0}}))
    with pytest.raises(ModelFileError, match=r"config.json: backbone.num_hidden_layers = 4.0 \(float\)"):
        ModelConfig.load(path)


def test_list_fields_are_checked_item_by_item():
    @dataclasses.dataclass
    class Section:
        sizes: tuple[int, ...] = (1,)

    assert build(Section, {"sizes": [2, 3]}).sizes == (2, 3)
    with pytest.raises(MMGenError, match=r"sizes.1 = 3.5 \(float\): must be an integer"):
        build(Section, {"sizes": [2, 3.5]})
    with pytest.raises(MMGenError, match="sizes = 2 \\(int\\): must be a list"):
        build(Section, {"sizes": 2})


# -- tokenizer.model --------------------------------------------------------------------------------


def test_missing_tokenizer_is_named(model_dir):
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model not found"):
        Pipeline.from_pretrained(model_dir)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b"", "is empty"),
    (lambda b: b[: len(b) // 3], "is not a SentencePiece model"),
    (lambda b: b"\x00\xff" * 500, "is not a SentencePiece model"),
])
def test_corrupt_tokenizer_is_named(model_dir, damage, match):
    path = model_dir / "tokenizer.model"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelFileError, match=f"tokenizer.model {match}.*mmgen train-text-tokenizer"):
        Pipeline.from_pretrained(model_dir)
    still_loads()


def test_a_tokenizer_without_mmgen_control_tokens_is_named(model_dir):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50), model_writer=buf, vocab_size=20,
                                   hard_vocab_limit=False, minloglevel=2)
    (model_dir / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ModelFileError, match=r"tokenizer.model was not trained by mmgen: it lacks the control tokens "
                                             r"\['<boi>', '<eoi>'"):
        Pipeline.from_pretrained(model_dir)


def test_another_models_tokenizer_is_refused(model_dir):
    other = TextTokenizer.train(["a red circle", "two blue squares", "seven"] * 20, vocab_size=300)
    other.save(model_dir)
    with pytest.raises(ModelFileError, match=rf"tokenizer.model is not the tokenizer .*model.safetensors was saved "
                                             rf"with \(their SHA-256 differ; it has {len(other)} pieces, the model's "
                                             r"vocabulary 1024\)"):
        Pipeline.from_pretrained(model_dir)  # the bundle records its tokenizer's digest
    model = MMGenModel(micro_config(len(other) - 1))
    with pytest.raises(ModelFileError, match=rf"has {len(other)} pieces but the model's vocabulary .* has "
                                             rf"{len(other) - 1}"):
        Pipeline(model, other)
    still_loads()


# -- pipeline inputs --------------------------------------------------------------------------------


def test_pipeline_needs_at_least_one_prompt_or_image():
    pipe = Pipeline.from_pretrained(DEFAULT_MODEL)
    with pytest.raises(InputError, match="Pipeline.draw got an empty list: give at least one prompt"):
        pipe.draw([])
    with pytest.raises(InputError, match="Pipeline.caption got an empty list: give at least one image"):
        pipe.caption([])
    with pytest.raises(InputError, match=r"takes a list of prompts, got str; .*Pipeline.draw\(\[prompt\]\)"):
        pipe.draw("a red circle")
    with pytest.raises(InputError, match="takes a list of images, got Tensor"):
        pipe.caption(torch.zeros(3, 16, 16))


# -- image tokenizer directories --------------------------------------------------------------------


@pytest.fixture
def vq_dir(tmp_path):
    cfg = ImageTokenizerConfig(kind="vq", channels=3, resolution=16, latent_channels=4, downsample=4, width=8,
                               codebook_size=32)
    build_image_tokenizer(cfg).save_pretrained(tmp_path / "vq")
    return tmp_path / "vq"


@pytest.mark.parametrize("path, value, match", [
    ("codebook_size", "32", r'config.json: codebook_size = "32" \(str\): must be an integer'),
    ("codebok_size", 32, r"unknown key 'codebok_size': did you mean 'codebook_size'\?"),
    ("downsample", 3, r"downsample = 3: must be a power of 2"),
    ("latent_scale", 0, r"latent_scale = 0.0: must be a number in \(0, inf\]"),
])
def test_bad_image_tokenizer_config_is_named(vq_dir, path, value, match):
    good = load_image_tokenizer(vq_dir)
    edit_config(vq_dir, path, value)
    with pytest.raises(ModelFileError, match=match):
        load_image_tokenizer(vq_dir)
    vq_dir.joinpath("config.json").write_text(json.dumps(dataclasses.asdict(good.config)))
    assert load_image_tokenizer(vq_dir).config == good.config


def test_corrupt_image_tokenizer_weights_are_named(vq_dir):
    weights = vq_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="vq/model.safetensors is truncated"):
        load_image_tokenizer(vq_dir)


# -- properties -------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _paths(v, prefix + (k,))
    return out


PATHS = _paths(GOOD_CONFIG)


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(PATHS), value=JSON, key=st.none() | st.text(max_size=12))
def test_any_json_in_a_config_field_gives_a_config_or_an_mmgen_error(path, value, key):
    cfg = json.loads(json.dumps(GOOD_CONFIG))
    node = cfg
    for k in path[:-1]:
        node = node[k]
    if key is None:
        node[path[-1]] = value
    else:
        node[key] = value  # a new (mostly unknown) key beside the field
    try:
        assert isinstance(ModelConfig.from_dict(cfg), ModelConfig)
    except MMGenError as e:
        assert isinstance(e, ValueError) and str(e)


@settings(max_examples=100, deadline=None)
@given(value=JSON)
def test_any_json_document_gives_a_config_or_an_mmgen_error(value, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(value))
    try:
        assert isinstance(ModelConfig.from_dict(read_json_object(path)), ModelConfig)
    except MMGenError as e:
        assert isinstance(e, ValueError) and str(e)
