"""Training data: sources, the seeded mixture, per-process shards, packing, and skipping bad items."""

from __future__ import annotations

import io
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import patch_noise

from mmgen.data.images import load_image
from mmgen.data.source import UnreadableItem
from mmgen.data.sources import build_source
from mmgen.errors import DataError, UnreadableImage
from mmgen.sequence import IGNORE, SequenceBuilder
from mmgen.train.config import SourceConfig
from mmgen.train.data import Mixture, StepBatches, TrainDataset, corpus
from mmgen.train.packing import Packer, pack_rows


def source(kind: str, **kw):
    return build_source(SourceConfig(kind=kind, **kw), seed=0, channels=1, resolution=8, max_chars=200, verbose=False)


def write_png(path, size=(20, 12), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    """4 good images, 1 garbage file, 1 truncated PNG, 1 caption naming a missing file, 1 malformed line."""
    d = tmp_path / "imgs"
    d.mkdir()
    lines = []
    for i in range(4):
        write_png(d / f"ok{i}.png", color=(60 * i, 100, 50))
        lines.append({"file_name": f"ok{i}.png", "text": f"a picture number {i}"})
    (d / "garbage.png").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    (d / "torn.png").write_bytes(buf.getvalue()[:40])
    lines += [{"file_name": "garbage.png", "text": "garbage"}, {"file_name": "torn.png", "text": "torn"},
              {"file_name": "gone.png", "text": "missing"}]
    (d / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return d


def test_load_image_resizes_center_crops_and_converts(tmp_path):
    write_png(tmp_path / "a.png", size=(30, 10))
    x = load_image(tmp_path / "a.png", channels=3, resolution=8)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert load_image(tmp_path / "a.png", channels=1, resolution=16).shape == (1, 16, 16)
    with pytest.raises(UnreadableImage, match="file not found"):
        load_image(tmp_path / "none.png", 1, 8)


def test_image_folder_counts_missing_and_skips_unreadable(folder, tokenizer, capsys):
    src = build_source(SourceConfig(kind="image_folder", path=str(folder)), seed=0, channels=1, resolution=8,
                       max_chars=200, verbose=True)
    assert len(src) == 6 and src.dropped == 2  # gone.png and the malformed line
    assert "skipped 1 malformed lines" in capsys.readouterr().err
    with pytest.raises(UnreadableItem, match="garbage.png"):
        src.sample(4, random.Random(0))
    with pytest.raises(UnreadableItem, match="torn.png"):
        src.sample(5, random.Random(0))
    ds = TrainDataset([src], Mixture([len(src)], [1.0], seed=0), SequenceBuilder(tokenizer, 1, 8, 16, 96), seed=0,
                      verbose=False)
    items = [ds[(0, j)] for j in range(len(ds))]
    assert sum(it.skipped for it in items) >= 2  # both unreadable files were met and skipped
    assert all(len(it.images) == 1 and it.images[0].shape == (1, 8, 8) for it in items)
    ds.max_skips = 0
    bad = next(j for j in range(len(ds)) if ds.mixture.locate(0, j)[1] == 4)
    with pytest.raises(DataError, match="unreadable items in a row"):
        ds[(0, bad)]


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        source("image_folder", path=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no captions file"):
        source("image_folder", path=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        source("text", path=str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="does not exist"):
        source("interleaved", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        source("hf", path=str(tmp_path / "nope"))


def test_text_and_interleaved_sources(tmp_path, folder):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond\n\n" + "x" * 450)
    text = source("text", path=str(tmp_path / "a.txt"))
    assert len(text) == 5 and text.sample(0, random.Random(0)) == ["first paragraph\nstill first"]  # 450 x: 3 chunks
    assert len(source("text", path=str(tmp_path / "a.txt"), text_unit="line")) == 6
    docs = [{"segments": [{"text": "look:"}, {"image": "imgs/ok0.png"}, {"text": "and"}, {"image": "imgs/ok1.png"}]},
            ["just text"], {"segments": [{"image": "imgs/gone.png"}]}, {"segments": "bad"}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    inter = source("interleaved", path=str(tmp_path / "docs.jsonl"))
    assert len(inter) == 2 and inter.dropped == 2
    sample = inter.sample(0, random.Random(0))
    assert sample[0] == "look:" and sample[1].shape == (1, 8, 8) and sample[2] == "and"
    assert list(inter.texts()) == ["look:", "and", "just text"]


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (10, 10), (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["red 0", "red 1", "red 2"]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    src = source("hf", path=str(tmp_path / "hf"), p_image_first=0.0, caption_dropout=0.0)
    assert len(src) == 3 and list(src.texts()) == ["red 0", "red 1", "red 2"]
    caption, image = src.sample(1, random.Random(0))
    assert caption == "red 1" and image.shape == (1, 8, 8)
    with pytest.raises(DataError, match="no split 'test'"):
        source("hf", path=str(tmp_path / "hf"), split="test")
    with pytest.raises(DataError, match="no column 'caption'"):
        source("hf", path=str(tmp_path / "hf"), text_column="caption")


def test_mixture_is_seeded_weighted_and_a_permutation_per_source():
    m = Mixture([50, 200], [1.0, 3.0], seed=3, epoch_size=2000)
    src, item = m.table(0)
    assert abs((src == 1).mean() - 0.75) < 0.04
    for s, size in ((0, 50), (1, 200)):
        first = item[src == s][:size]
        assert sorted(first.tolist()) == list(range(size))  # each pass over a source is a permutation
    again = Mixture([50, 200], [1.0, 3.0], seed=3, epoch_size=2000)
    assert [again.locate(0, j) for j in range(0, 2000, 37)] == [m.locate(0, j) for j in range(0, 2000, 37)]
    assert not np.array_equal(m.table(1)[1], item)  # a new order each epoch
    single = Mixture([10], [1.0], seed=0)
    assert sorted(single.table(0)[1].tolist()) == list(range(10))


def test_caption_directions_are_a_function_of_seed_epoch_and_item(tokenizer):
    digits = source("digits")
    ds = TrainDataset([digits], Mixture([len(digits)], [1.0], seed=3), SequenceBuilder(tokenizer, 1, 8, 16, 96), seed=3)

    def image_first(epoch: int, positions=range(300)) -> dict[int, bool]:  # item -> its sample starts with the image
        return {ds.mixture.locate(epoch, j)[1]: ds[(epoch, j)].conditions[0] for j in positions}

    first = image_first(0)
    assert first == image_first(0, reversed(range(300)))  # the same draws again, in any order
    assert 0.1 < sum(first.values()) / len(first) < 0.3  # p_image_first = 0.2
    again = image_first(1)
    common = set(first) & set(again)
    assert len(common) > 20 and any(first[i] != again[i] for i in common)  # a new draw each epoch


def test_process_shards_together_are_the_global_batch():
    one = list(StepBatches(100, 8, rank=0, world=1, accum=1, start=0, end=30))
    shards = [list(StepBatches(100, 8, rank=r, world=2, accum=2, start=0, end=30)) for r in range(2)]
    for step in range(30):
        parts = shards[0][2 * step : 2 * step + 2] + shards[1][2 * step : 2 * step + 2]
        assert [k for p in parts for k in p] == one[step]
    assert one[12][0] == (1, 0)  # 12 steps of 8 fit one epoch of 100; step 12 starts epoch 1
    resumed = list(StepBatches(100, 8, 0, 1, 1, start=17, end=30))
    assert resumed == one[17:]
    with pytest.raises(DataError, match="not divisible"):
        StepBatches(100, 6, 0, 2, 2, 0, 1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatches(4, 8, 0, 1, 1, 0, 1)


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 7, 2, 9], capacity=10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 7, 2, 9][i] for i in r) <= 10 for r in rows) and len(rows) == 3


def _items(tokenizer, n=6):
    from conftest import digit

    builder = SequenceBuilder(tokenizer, 1, 8, 16, 96)
    ds = TrainDataset([], SimpleNamespace(), builder, seed=0)
    samples = [["a digit", digit(i)] if i % 3 else [digit(i), "seven"] for i in range(n)] + [["a much longer text-only sample, " * 3]]
    return builder, samples, [ds.tokenize(s) for s in samples]


def test_pad_mode_equals_the_sequence_builder(tokenizer):
    builder, samples, items = _items(tokenizer)
    ours = Packer(tokenizer.pad_id, 1, 8, "pad").__call__(items).batch
    ref = builder(samples)
    real = ref.doc_id >= 0
    for name in ("ids", "image_id", "doc_id", "labels", "images", "image_conditions"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert torch.equal(ours.positions[real], ref.positions[real])


def test_packing_keeps_samples_apart_and_the_loss_unchanged(tokenizer, model, monkeypatch):
    patch_noise(monkeypatch)
    _, _, items = _items(tokenizer)
    padded = Packer(tokenizer.pad_id, 1, 8, "pad")(items)
    packed = Packer(tokenizer.pad_id, 1, 8, "pack", length=96)(items)
    b = packed.batch
    assert b.ids.shape[0] < padded.batch.ids.shape[0]  # fewer rows
    assert packed.stats["tokens"] == padded.stats["tokens"] and packed.stats["labelled"] == padded.stats["labelled"]
    pad_share = lambda p: 1 - p.stats["tokens"] / p.stats["slots"]  # noqa: E731
    assert pad_share(packed) < pad_share(padded)
    starts = (b.positions == 0) & (b.doc_id >= 0)
    assert int(starts.sum()) == len(items)  # every sample restarts its positions
    before_start = torch.zeros_like(starts)
    before_start[:, :-1] = starts[:, 1:]
    assert (b.labels[before_start] == IGNORE).all()  # no label crosses into the next sample
    with torch.no_grad():
        a, c = model.loss(padded.batch), model.loss(b)
    for k in ("lm_sum", "image_sum", "tokens", "images"):
        torch.testing.assert_close(a[k], c[k], rtol=1e-5, atol=1e-5)


def test_overlong_text_is_truncated_and_counted(tokenizer):
    builder = SequenceBuilder(tokenizer, 1, 8, 16, 32)
    ds = TrainDataset([], SimpleNamespace(), builder, seed=0)
    item = ds.tokenize(["word " * 100])
    assert item.truncated and len(item.ids) == 32
    from conftest import digit

    with pytest.raises(UnreadableItem, match="over the model's maximum"):
        ds.tokenize(["word " * 100, digit()])


def test_tokenizer_corpus_draws_from_every_source(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\n\ngamma")
    texts = corpus([source("digits"), source("text", path=str(tmp_path / "a.txt"))], limit=4)
    assert len(texts) == 4 and "beta" in texts and any("digit" in t or "number" in t for t in texts)
