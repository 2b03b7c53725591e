"""Hostile input through the API: every failure is a typed error naming the field or input, its value and
what is allowed, and the next good call still works. Property tests feed arbitrary values, message
structures and arrays; the only outcomes allowed are a valid result or the documented error."""

from __future__ import annotations

import dataclasses
import math
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image, ImageFile

from mmgen.chat import Chat
from mmgen.chat_template import check_text
from mmgen.data.images import MAX_PIXELS, load_image
from mmgen.diffusion.guidance import Guidance
from mmgen.diffusion.objective import Objective
from mmgen.diffusion.schedules import make_sigmas
from mmgen.errors import ChatError, InputError, OptionError, UnreadableImage
from mmgen.sampling import MAX_STEPS, GenerationOptions, sample_token

USER = [{"role": "user", "content": "draw a red circle"}]
FAST = dict(image="always", image_steps=2, max_new_tokens=2)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def chat() -> Chat:
    return Chat.from_pretrained()  # the bundled model: 16×16 RGB images drawn in the backbone


def draws_an_image(chat: Chat, messages=USER) -> None:
    parts = chat(messages, **FAST)
    assert isinstance(parts[0], Image.Image) and parts[0].size == (16, 16)


# -- options ----------------------------------------------------------------------------------------


BAD_OPTIONS = [
    ({"guidance": math.nan}, r"guidance = nan: must be a number in \[0, 100\]"),
    ({"guidance": -math.inf}, r"guidance = -inf: must be a number in \[0, 100\]"),
    ({"guidance": "7"}, r"guidance = '7' \(str\): must be a number"),
    ({"max_new_tokens": 0}, r"max_new_tokens = 0: must be an integer in \[1, inf\]"),
    ({"max_new_tokens": -3}, r"max_new_tokens = -3"),
    ({"image_steps": MAX_STEPS + 1}, r"image_steps = 1001: must be an integer in \[1, 1000\]"),
    ({"temperature": "0.5"}, r"temperature = '0.5' \(str\): must be a number in \[0, 100\]"),
    ({"temperature": 1e-9}, r"temperature = 1e-09: must be 0 \(greedy\) or a number in \[0.001, 100\]"),
    ({"top_p": 1.5}, r"top_p = 1.5: must be a number in \(0, 1\]"),
    ({"min_p": 1.0}, r"min_p = 1.0: must be a number in \[0, 1\)"),
    ({"top_k": 2.5}, r"top_k = 2.5 \(float\): must be an integer in \[0, inf\]"),
    ({"max_images": -1}, r"max_images = -1: must be an integer in \[0, inf\]"),
    ({"shift": 0}, r"shift = 0: must be a number in \[0.01, 100\], or 'auto'"),
    ({"eta": -0.5}, r"eta = -0.5: must be a number in \[0, inf\], or None"),
    ({"cache_threshold": math.inf}, r"cache_threshold = inf"),
    ({"sampler": "eulr"}, r"sampler = 'eulr': must be one of 'euler', 'heun'"),
    ({"noise": "pink"}, r"noise = 'pink': must be one of 'brownian', 'iid'"),
    ({"schedule": [1.0, 2.0]}, r"schedule = \[1.0, 2.0\]: not strictly decreasing"),
    ({"schedule": [math.nan, 0.0]}, r"schedule\[0\] = nan: must be a number in \[0, 999\]"),
    ({"schedule": "cosine"}, r"schedule = 'cosine': unknown schedule; must be 'uniform' or 'karras'"),
    ({"seed": -1}, r"seed = -1: must be an integer in \[0, "),
    ({"seed": 2**32}, r"seed = 4294967296"),
    ({"seed": 1.5}, r"seed = 1.5 \(float\)"),
    ({"scale": 0}, r"scale = 0: must be an integer in \[1, 64\]"),
    ({"image": "sometimes"}, r"image = 'sometimes': must be one of 'auto', 'always', 'never'"),
    ({"size": 32}, r"size = 32: this model draws 16×16 images"),
    ({"temprature": 0.5}, r"unknown option\(s\) \['temprature'\]"),
    ({"image_top_k": 4}, r"image_top_k do not apply to the 'diffusion' image interface"),
    ({"sampler": "euler", "eta": 0.5}, r"'euler' is deterministic"),
]


def test_bad_options_are_option_errors_and_the_next_call_works(chat):
    for options, match in BAD_OPTIONS:
        with pytest.raises(OptionError, match=match):
            chat(USER, **options)
        with pytest.raises(OptionError, match=match):
            next(chat.stream(USER, **options))
    draws_an_image(chat)


def test_nan_guidance_is_an_error_not_a_black_image(chat):
    with pytest.raises(OptionError, match=r"guidance scale = nan: must be a number in \[0, 100\]"):
        chat(USER, guidance=Guidance(scale=math.nan), **FAST)
    with pytest.raises(OptionError, match="guidance = nan"):
        chat.pipe.draw(["a red circle"], GenerationOptions(guidance=math.nan))
    image = chat.pipe.draw(["a red circle"], GenerationOptions(guidance=3.0, image_steps=2))[0]
    assert torch.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize("field, value, match", [
    ("scale", -1.0, r"guidance scale = -1.0: must be a number in \[0, 100\]"),
    ("scale", math.inf, r"guidance scale = inf"),
    ("kind", "pag", r"guidance kind = 'pag': must be one of 'cfg', 'apg'"),
    ("eta", 2.0, r"guidance eta = 2.0: must be a number in \[0, 1\]"),
    ("norm_threshold", -1, r"guidance norm_threshold = -1"),
    ("momentum", 1.0, r"guidance momentum = 1.0: must be a number in \(-1, 1\)"),
    ("rescale", 1.5, r"guidance rescale = 1.5: must be a number in \[0, 1\]"),
    ("threshold", "static", r"guidance threshold = 'static': must be one of None, 'imagen', 'mimic'"),
    ("percentile", 0, r"guidance percentile = 0: must be a number in \(0, 1\]"),
    ("mimic_scale", math.nan, r"guidance mimic_scale = nan"),
    ("interval", (5.0, 0.3), r"guidance interval = \(5.0, 0.3\): must be None .* 0 <= lo < hi"),
    ("interval", (0.0, math.inf), r"guidance interval hi = inf"),
    ("interval", 3.0, r"guidance interval = 3.0"),
])
def test_bad_guidance_fields_are_option_errors(field, value, match):
    with pytest.raises(OptionError, match=match):
        Guidance(**{field: value})


def test_guidance_edges_that_mean_something_are_allowed():
    assert not Guidance(scale=1.0).active(2.0)  # 1: guidance off
    assert Guidance(scale=0.0).active(2.0)  # 0: the unconditional prediction
    assert Guidance(interval=[0.3, 5]).interval == (0.3, 5.0)


def test_the_step_ceiling_holds_for_the_backbone_and_the_mlp_head():
    with pytest.raises(OptionError, match=r"steps = 1001: must be an integer in \[1, 1000\]"):
        make_sigmas(Objective("flow"), MAX_STEPS + 1)  # the MLP head's steps per token go through here
    with pytest.raises(OptionError, match=r"schedule = a list of 1001 steps"):
        GenerationOptions(schedule=[i / 10 for i in range(MAX_STEPS + 1, 0, -1)])
    assert len(make_sigmas(Objective("flow"), MAX_STEPS)) == MAX_STEPS + 1


def test_huge_integers_are_compared_exactly_not_overflowed():
    """10**400 overflows a float: the checks compare ints as ints (no OverflowError)."""
    assert GenerationOptions(max_new_tokens=10**400).max_new_tokens == 10**400  # the context ends the row
    with pytest.raises(OptionError, match=r"image_steps = 1000000000000.*: must be an integer in \[1, 1000\]"):
        GenerationOptions(image_steps=10**400)
    with pytest.raises(OptionError, match=r"guidance"):
        GenerationOptions(guidance=10**400)


# -- images -----------------------------------------------------------------------------------------


def test_tensors_out_of_range_are_refused_with_the_conversion(chat):
    pixels = torch.rand(3, 16, 16) * 255
    with pytest.raises(UnreadableImage, match=r"outside \[-1, 1\]: they look like 0..255 pixels: convert with "
                                              r"x / 127.5 - 1"):
        load_image(pixels, 3, 16)
    with pytest.raises(UnreadableImage, match=r"look like \[0, 1\] values .* \(x \* 2 - 1\)\.clamp\(-1, 1\)"):
        load_image(torch.rand(3, 16, 16) * 1.05, 3, 16)
    with pytest.raises(UnreadableImage, match="2 NaN or infinite value"):
        load_image(torch.zeros(3, 16, 16).index_put_((torch.tensor([0, 1]),) * 3, torch.tensor([math.inf, math.nan])),
                   3, 16)
    with pytest.raises(ChatError, match="0..255 pixels"):  # through the chat, where it names the input
        chat([{"role": "user", "content": [pixels, "what is this?"]}], max_new_tokens=2)
    edge = torch.full((3, 16, 16), 1.0005)  # resampling error within RANGE_TOLERANCE: clamped
    assert load_image(edge, 3, 16).max() == 1.0
    assert chat([{"role": "user", "content": [pixels / 127.5 - 1, "what is this?"]}], max_new_tokens=2)


def asymmetric(width: int = 24, height: int = 16) -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    arr[: height // 2, : width // 3] = 255  # a bright corner, so a wrong rotation cannot match
    return Image.fromarray(arr)


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180),
                                                    (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(tmp_path, orientation, transpose):
    image = asymmetric()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"
    image.save(path, exif=exif)
    expected = load_image(image.transpose(transpose), 3, 16)
    assert not torch.equal(expected, load_image(image, 3, 16))
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        assert torch.equal(load_image(source, 3, 16), expected)


def test_a_huge_jpeg_is_decoded_small(tmp_path, monkeypatch):
    path = tmp_path / "huge.jpg"
    Image.new("L", (10_000, 10_000), 128).save(path, quality=50)  # a solid colour: about 1 MB
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (decoded.append(self.size), load(self))[1])
    start = time.perf_counter()
    out = load_image(path, 3, 16)
    assert time.perf_counter() - start < 5
    assert out.shape == (3, 16, 16) and torch.allclose(out, torch.full_like(out, 128 / 127.5 - 1), atol=0.02)
    assert set(decoded) == {(1250, 1250)}  # JPEG draft at 1/8 scale: 1.6 MB decoded instead of 100 MB


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and header of the given size, with no pixel data: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_images_over_the_pixel_limit_are_refused_before_decoding(chat, tmp_path):
    side = math.isqrt(MAX_PIXELS) + 1
    path = tmp_path / "big.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(UnreadableImage, match=rf"big.png: image is {side}×{side} pixels to decode .* over the limit "
                                              r"of 64 megapixels \(MAX_PIXELS\): downscale it first"):
        load_image(path, 3, 16)
    with pytest.raises(UnreadableImage, match="image bytes: too large to decode .*DecompressionBomb|exceeds limit"):
        load_image(png_header(20_000, 20_000), 3, 16)  # PIL's own bomb check, past 2 × Image.MAX_IMAGE_PIXELS
    with pytest.raises(ChatError, match="over the limit"):
        chat([{"role": "user", "content": [path, "what is this?"]}], max_new_tokens=2)
    draws_an_image(chat, [{"role": "user", "content": [asymmetric(), "draw it again"]}])


# -- text -------------------------------------------------------------------------------------------


def test_invalid_unicode_and_non_text_are_errors_naming_the_message(chat):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cases = [
        (["draw", "a \udc80 circle"], r"message 2 part 1: character 2 of the text \('\\udc80'\) is a lone surrogate"),
        ("\ud800", r"message 2: character 0 of the text \('\\ud800'\) is a lone surrogate.* fix the text"),
        ([{"type": "text", "text": None}], r"message 2: text must be a str, got NoneType"),
        ([{"type": "text", "text": b"hi"}], r"message 2: text must be a str, got bytes: decode bytes first"),
        ([b"hi"], r"message 2: a bytes part is ambiguous"),
        ([7], r"message 2: unsupported content part of type int"),
    ]
    for content, match in cases:
        with pytest.raises(ChatError, match=match):
            chat(history + [{"role": "user", "content": content}], max_new_tokens=2)
    with pytest.raises(InputError, match=r"prompt 3: character 1 .* lone surrogate") as e:
        check_text("a\udfffb", "prompt 3")
    assert not isinstance(e.value, ChatError)  # prompts outside a chat are InputErrors
    assert check_text("a <boi> b") == "a <boi> b"
    assert chat(history + [{"role": "user", "content": "draw a circle"}], max_new_tokens=2)


# -- properties -------------------------------------------------------------------------------------


ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=6), st.binary(max_size=3),
    st.lists(st.floats(), max_size=4), st.tuples(st.floats(), st.floats()),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
NAMES = st.sampled_from(["uniform", "karras", "auto", "euler", "ddim", "iid", "brownian", "cfg", "apg", "mimic"])
EDGES = st.sampled_from([0, 1, 1.0, -0.0, 5e-324, 1e-3, 0.9999999, 100, 100.0, 999.0, 1000, 1001])
PLAUSIBLE = st.one_of(st.none(), st.integers(0, 30), st.floats(0, 1), NAMES, EDGES,
                      st.tuples(st.floats(0, 1), st.floats(1, 9)),
                      st.lists(st.floats(0, 999), min_size=1, max_size=4).map(lambda s: sorted(set(s), reverse=True)))
VALUE = st.one_of(PLAUSIBLE, PLAUSIBLE, ANY)  # two thirds near the valid ranges, a third anything
OPTION_FIELDS = [f.name for f in dataclasses.fields(GenerationOptions)]
GUIDANCE_FIELDS = [f.name for f in dataclasses.fields(Guidance)]


@PROPERTY
@given(st.dictionaries(st.sampled_from(OPTION_FIELDS), VALUE, max_size=2))
def test_any_option_values_give_valid_options_or_an_option_error(values):
    try:
        opts = GenerationOptions(**values)
    except OptionError as e:
        assert any(name in str(e) for name in values), str(e)
        return
    logits = torch.randn(2, 7)
    tokens = sample_token(logits, [torch.Generator().manual_seed(i) for i in range(2)], opts.temperature,
                          opts.top_k, opts.top_p, opts.min_p)
    assert ((tokens >= 0) & (tokens < 7)).all()


@PROPERTY
@given(st.dictionaries(st.sampled_from(GUIDANCE_FIELDS), VALUE, max_size=2))
def test_any_guidance_values_give_finite_guidance_or_an_option_error(values):
    try:
        guidance = Guidance(**values)
    except OptionError as e:
        assert any(name in str(e) for name in values), str(e)
        return
    cond, uncond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.isfinite(guidance.combine(cond, uncond, {})).all()


CONTROL = st.sampled_from(["<boi>", "<eoi>", "<|user|>", "<|assistant|>", "<|end|>", "<s>", "</s>", "<pad>"])
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.one_of(st.text(st.characters(exclude_categories=()), max_size=8), st.text(min_size=1, max_size=8),
                 st.tuples(st.text(max_size=3), SURROGATE, st.text(max_size=3)).map("".join), CONTROL,
                 st.lists(st.one_of(CONTROL, st.text(max_size=4)), max_size=3).map(" ".join))
GOOD_IMAGES = st.sampled_from([torch.zeros(3, 8, 8), np.zeros((8, 8, 3), np.uint8)])
IMAGES = st.one_of(GOOD_IMAGES, st.sampled_from([torch.full((3, 8, 8), 9.0), np.zeros((2, 40), np.uint8),
                                                 b"not an image", "no/such/file.png"]))
KEYS = st.sampled_from(["role", "content", "type", "text", "image"])
JSON = st.recursive(
    st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=3), TEXT, IMAGES,
              st.sampled_from(["user", "assistant", "system", "text", "image"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.one_of(KEYS, TEXT), inner, max_size=3)),
    max_leaves=8,
)
PART = st.one_of(TEXT, IMAGES, JSON, st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(TEXT, JSON)}),
                 st.fixed_dictionaries({"type": st.just("image"), "image": st.one_of(IMAGES, JSON)}))
CONTENT = st.one_of(TEXT, PART, st.lists(PART, max_size=3))
MESSAGE = st.one_of(JSON, st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant"]), JSON),
                                                 "content": CONTENT}))
GOOD_PART = st.one_of(TEXT, GOOD_IMAGES, st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}))
TURN = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                              "content": st.one_of(TEXT, st.lists(GOOD_PART, min_size=1, max_size=3), CONTENT)})
CONVERSATION = st.tuples(st.lists(TURN, max_size=2), TURN).map(lambda t: t[0] + [{**t[1], "role": "user"}])


@PROPERTY
@given(st.one_of(JSON, st.lists(MESSAGE, max_size=3), CONVERSATION, CONVERSATION))
def test_any_messages_render_or_raise_a_chat_or_input_error(chat, messages):
    try:
        prompt = chat.prompt(messages)
    except InputError as e:
        str(e).encode("utf-8")  # the message itself can be printed
        return
    markers = {chat.tokenizer.user_id, chat.tokenizer.assistant_id, chat.tokenizer.end_id}
    for segment in prompt:
        if isinstance(segment, str):  # typed control strings stay ordinary text pieces
            assert not set(chat.tokenizer.encode(segment)) & set(chat.tokenizer.special_ids)
        elif isinstance(segment, list):
            assert set(segment) <= markers
        else:
            assert segment.shape == (3, 16, 16)


FLOATS = st.one_of(st.floats(width=32), st.floats(-1, 1, width=32))
SOURCES = st.one_of(
    arrays(st.sampled_from([np.uint8, np.float32, np.float64, np.int16, np.bool_]), array_shapes(min_dims=0, max_dims=4,
                                                                                             min_side=0, max_side=10)),
    arrays(np.float32, st.tuples(st.integers(0, 4), st.integers(0, 10), st.integers(0, 10)), elements=FLOATS).flatmap(
        lambda a: st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]).map(
            lambda dtype: torch.from_numpy(a).to(dtype))),
    arrays(np.uint8, st.tuples(st.integers(1, 10), st.integers(1, 10), st.sampled_from([1, 3, 4]))),
    st.binary(max_size=64),
)


@PROPERTY
@given(SOURCES, st.sampled_from([1, 3]))
def test_any_array_or_tensor_loads_in_range_or_is_unreadable(source, channels):
    try:
        out = load_image(source, channels, 16)
    except UnreadableImage:
        return
    assert out.shape == (channels, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1


def test_pil_images_of_any_mode_load_or_are_unreadable():
    for mode in ("1", "L", "P", "RGB", "RGBA", "LA", "I", "F", "I;16", "CMYK", "YCbCr", "HSV", "LAB"):
        try:
            assert load_image(Image.new(mode, (40, 30)), 3, 16).shape == (3, 16, 16)
        except UnreadableImage as e:
            assert mode in str(e)
    nan = Image.fromarray(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(UnreadableImage, match="NaN or infinite"):
        load_image(nan, 1, 16)
