"""Image editing (issue 16): the edit pairs change exactly what the instruction says and keep the other
objects' pixels; held-out edits never reach training; an edit conversation tokenizes with its images;
`Chat.edit` and `mmgen edit` refuse a missing or second image, an empty instruction and best_of, and say
so when the model answers without an image."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from test_cli_errors import fails, no_model  # noqa: F401 (fixture)

from mmgen.chat import Chat
from mmgen.chat_template import Message
from mmgen.data.edits import EDIT_KINDS, EditSource, Scene, held_out, sample_edit
from mmgen.data.shapes import _PHRASES
from mmgen.errors import ChatError, ConfigError, OptionError
from mmgen.sequence import SequenceBuilder
from mmgen.train.config import load_config
from mmgen.train.data import Mixture, TrainDataset


def by_cell(scene) -> dict:
    return {o.position: (o.color, o.shape) for o in scene.objects}


def test_each_kind_changes_exactly_what_it_says():
    kinds = Counter()
    for seed in range(400):
        e = sample_edit(random.Random(seed))
        kinds[e.kind] += 1
        before, after = by_cell(e.before), by_cell(e.after)
        changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        kept = before.keys() & after.keys() - changed
        assert all(before[p] == after[p] for p in kept) and 1 <= len(e.after.objects) <= 2
        if e.kind in ("recolor", "reshape"):
            (p,) = changed
            field = 0 if e.kind == "recolor" else 1
            assert before[p][1 - field] == after[p][1 - field] and after[p][field] in e.instruction
        elif e.kind == "move":
            old, new = sorted(changed, key=lambda q: q in after)
            assert old not in after and new not in before and before[old] == after[new]
            assert _PHRASES[new].split()[-1] in e.instruction
        elif e.kind == "add":
            (p,) = changed
            assert p not in before and " ".join(after[p]) in e.instruction and _PHRASES[p] in e.instruction
        else:
            (p,) = changed
            assert p not in after and before[p][1] in e.instruction and len(e.after.objects) == 1
    assert set(kinds) == set(EDIT_KINDS) and min(kinds.values()) > 40, kinds


def layer(scene: Scene, positions: set[str]) -> np.ndarray:
    """Where the scene's objects in `positions` cover any pixel: bool (H, W) at 16 px."""
    kept = [(o, j) for o, j in zip(scene.objects, scene.jitter) if o.position in positions]
    return Scene(tuple(o for o, _ in kept), tuple(j for _, j in kept)).render(16).any(-1)


def test_objects_the_edit_does_not_touch_keep_their_pixels():
    for seed in range(100):
        e = sample_edit(random.Random(seed))
        b, a = e.before.render(16), e.after.render(16)
        before, after = by_cell(e.before), by_cell(e.after)
        changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        elsewhere = ~(layer(e.before, changed) | layer(e.after, changed))  # pixels no changed object touches
        assert np.array_equal(b[elsewhere], a[elsewhere]) and not np.array_equal(b, a), e.kind
        if len(e.before.objects) + len(e.after.objects) > 3:  # an untouched object: it is drawn, and kept
            assert b[elsewhere].any()


def test_held_out_edits_never_reach_training():
    train = {sample_edit(random.Random(i), "train").key for i in range(1500)}
    test = {sample_edit(random.Random(i), "held_out").key for i in range(300)}
    assert train and test and not train & test
    assert all(not held_out(k) for k in train) and all(held_out(k) for k in test)
    assert {k.split()[0] for k in test} == set(EDIT_KINDS)  # every kind has held-out edits
    share = len(test) / (len(test) + len(train))
    assert 0.04 < share < 0.2, share  # about a tenth of the distinct edits
    with pytest.raises(ValueError, match="held_out"):
        sample_edit(random.Random(0), "test")


def test_an_edit_conversation_tokenizes_with_its_images(tokenizer):
    source = EditSource(20, channels=1, resolution=8)
    builder = SequenceBuilder(tokenizer, 1, 8, 16, 512)
    dataset = TrainDataset([source], Mixture([len(source)], [1.0], 0), builder, seed=0)
    for i in range(20):
        conversation = source.sample(i, random.Random(i))
        assert [m.role for m in conversation] in (["user", "assistant"], ["user", "assistant"] * 2)
        first: Message = conversation[0]
        assert sum(not isinstance(p, str) for p in first.parts) == 1  # one image, one instruction
        item = dataset.tokenize(conversation)
        answers = len(conversation) // 2  # the shown image is a (noise-capped) condition, each answer's is drawn
        assert item.conditions == [True] + [False] * answers
        assert len(item.images) == 1 + answers and all(im.shape == (1, 8, 8) for im in item.images)


def test_config_takes_an_edits_source_and_checks_its_split():
    cfg = load_config("chat-tiny")
    assert "edits" in [s.kind for s in cfg.data.sources]
    with pytest.raises(ConfigError, match="an edits source takes train or held_out"):
        load_config("chat-tiny", {"data.sources": [{"kind": "edits", "split": "test"}]})


@pytest.fixture(scope="module")
def chat() -> Chat:
    return Chat.from_pretrained()


def test_chat_edit_refuses_what_it_cannot_do(chat):
    image = Image.fromarray(sample_edit(random.Random(0)).before.render(16))
    with pytest.raises(ChatError, match="an edit needs the image to change"):
        chat.edit(None, "make it blue")
    with pytest.raises(ChatError, match="an edit changes one image, got 2"):
        chat.edit([image, image], "make it blue")
    with pytest.raises(ChatError, match="an edit needs an instruction"):
        chat.edit(image, "   ")
    with pytest.raises(OptionError, match="best_of = 4: an edit is drawn once"):
        chat.edit(image, "make it blue", best_of=4)
    with pytest.raises(ChatError, match="the model answered without an image"):
        chat.edit(image, "make it blue", image="never")


def test_mmgen_edit_takes_one_image_and_checks_the_output_first(tmp_path, capsys, no_model):  # noqa: F811
    path = tmp_path / "in.png"
    Image.fromarray(sample_edit(random.Random(0)).before.render(16)).save(path)
    err = fails(["edit", str(path), str(path), "make it blue"], capsys)
    assert "mmgen edit changes one image, got 2" in err
    err = fails(["edit", str(path), "make it blue", "-o", str(tmp_path / "out.txt")], capsys)
    assert "is not an image format" in err
