"""The bundled default model end to end: it loads offline, draws what is asked, and holds a conversation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen.chat import Chat
from mmgen.cli import main
from mmgen.data.digits import DigitsDataset, parse_digit
from mmgen.data.images import load_image
from mmgen.evaluation import DigitClassifier
from mmgen.pipeline import to_pil


@pytest.fixture(scope="module")
def chat() -> Chat:
    return Chat.from_pretrained()


@pytest.fixture(scope="module")
def classifier(chat) -> DigitClassifier:
    c = chat.model.config.image
    return DigitClassifier(c.channels, c.resolution)


def test_three_turn_conversation_through_the_api(chat, classifier):
    messages = [{"role": "user", "content": "hello! what can you do?"}]
    first = chat(messages)
    assert first and all(isinstance(p, str) for p in first)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "draw a handwritten digit 7"}]
    second = chat(messages)
    images = [p for p in second if isinstance(p, Image.Image)]
    assert len(images) == 1 and classifier.predict(load_image(images[0], 3, images[0].width)[None])[0] == 7
    messages += [{"role": "assistant", "content": second}, {"role": "user", "content": "what did you draw?"}]
    third = chat(messages)
    assert parse_digit(" ".join(p for p in third if isinstance(p, str))) == 7


def test_three_turn_conversation_through_the_cli(tmp_path, capsys, classifier):
    main(["chat", "-m", "hello! what can you do?", "-m", "draw a handwritten digit 7", "-m", "what did you draw?",
          "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    saved = sorted(tmp_path.glob("*.png"))
    assert len(saved) == 1 and f"[image: {saved[0]}]" in out
    assert classifier.predict(load_image(saved[0], 3, 16)[None])[0] == 7
    last = out.strip().splitlines()[-1]
    assert last.startswith("mmgen>") and parse_digit(last) == 7


def test_generate_and_caption_default_to_the_bundled_model(tmp_path, capsys, classifier):
    main(["generate", "a handwritten digit 3", "-o", str(tmp_path / "three.png")])
    image = Image.open(tmp_path / "three.png")
    assert image.size == (128, 128)  # 16×16, saved 8× upscaled
    assert classifier.predict(load_image(image, 3, 16)[None])[0] == 3
    capsys.readouterr()
    test = DigitsDataset("test")
    paths = []
    for i in range(50):  # 50, not 10: the model captions 92.6% of the 297; ten are too few to judge it by
        paths.append(str(tmp_path / f"held_out_{i}.png"))
        to_pil(test.images[i]).save(paths[-1])  # 8×8 grey PNGs
    main(["caption", *paths])
    captions = [line.split("\t", 1)[1] for line in capsys.readouterr().out.strip().splitlines()]
    right = [parse_digit(c) == int(y) for c, y in zip(captions, test.labels[:50], strict=True)]
    assert np.mean(right) >= 0.85, captions


def test_a_shapes_request_gets_the_color_asked_for(chat):
    from mmgen.data.shapes import classify_color

    reply = chat([{"role": "user", "content": "draw a red circle"}])
    image = next(p for p in reply if isinstance(p, Image.Image))
    assert classify_color(np.asarray(image.convert("RGB")).reshape(-1, 3)) == "red"
    assert any("red" in p for p in reply if isinstance(p, str))
    assert torch.is_tensor(load_image(image, 3, 16))


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_bundle_writes_a_directory_that_loads_with_its_tokenizer_and_digest(kind, tmp_path):
    """`python -m mmgen.bundle`: float16 weights, the text tokenizer's own files (SentencePiece, or a
    pretrained checkpoint's tokenizer.json and companions) and the tokenizer digest in the weights' header."""
    from conftest import micro_config
    from test_hf_tokenizer import tiny_hf_tokenizer

    from mmgen.bundle import bundle
    from mmgen.files import TOKENIZER_DIGEST, read_weights_metadata
    from mmgen.model import MMGenModel
    from mmgen.pipeline import Pipeline
    from mmgen.tokenizers.hf_text import HFTextTokenizer

    if kind == "hf":
        (tmp_path / "hf").mkdir()
        tiny_hf_tokenizer("llama").save_pretrained(tmp_path / "hf")
        tokenizer = HFTextTokenizer.load(tmp_path / "hf")
    else:
        tokenizer = Chat.from_pretrained().tokenizer
    model = MMGenModel(micro_config(len(tokenizer)))
    model.save_pretrained(tmp_path / "run", tokenizer)
    out = bundle(tmp_path / "run", tmp_path / "bundled")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "run").iterdir())
    assert read_weights_metadata(out / "model.safetensors")[TOKENIZER_DIGEST] == tokenizer.digest()
    loaded = Pipeline.from_pretrained(out)
    assert loaded.tokenizer.encode("a handwritten digit 7 <boi>") == tokenizer.encode("a handwritten digit 7 <boi>")
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name].half().float(), msg=name)
