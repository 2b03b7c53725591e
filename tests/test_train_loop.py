"""The loop end to end: user data with bad files, learning, the non-finite guard, frozen parameters, the
text tokenizer command, and the exported model loading for generation."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from train_helpers import micro_config, restore_threads  # noqa: F401 (autouse fixture)

from mmgen.errors import TrainingError
from mmgen.pipeline import Pipeline
from mmgen.tokenizers.text import TextTokenizer
from mmgen.train import text_tokenizer
from mmgen.train.config import TrainConfig
from mmgen.train.entrypoint import main
from mmgen.train.optim import EMA, lr_at, param_groups
from mmgen.train.overrides import build
from mmgen.train.tracking import read_log
from mmgen.train.trainer import Trainer


def image_folder(root, n=12):
    root.mkdir()
    lines = []
    for i in range(n):
        Image.new("RGB", (24, 16), (20 * i, 255 - 20 * i, 90)).save(root / f"{i}.png")
        lines.append({"file_name": f"{i}.png", "text": f"a color swatch number {i}"})
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    lines += [{"file_name": "broken.png", "text": "broken"}, {"file_name": "absent.jpg", "text": "absent"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return root


def test_image_folder_run_with_bad_files_trains_exports_and_samples(tmp_path, capsys):
    folder = image_folder(tmp_path / "swatches")
    cfg = micro_config(tmp_path / "run", tmp_path, tokenizer={"path": None, "vocab_size": 300},
                       data={"sources": [{"kind": "image_folder", "path": str(folder)}], "epoch_size": 64},
                       train={"steps": 6}, checkpoint={"every": 3},
                       samples={"every": 6, "prompts": ["a color swatch number 3"], "per_prompt": 2, "image_steps": 3})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == tmp_path / "run"
    captured = capsys.readouterr()
    assert "skipped 0 malformed lines" in captured.err and "1 captions whose image is missing" in captured.err
    assert "skipping an unreadable item" in captured.err and "broken.png" in captured.err
    assert "tok/s" in captured.out and "pad " in captured.out
    rows = read_log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert int(rows[-1]["skipped_items"]) > 0  # the broken file was met, skipped and counted
    assert 0 <= float(rows[-1]["padding"]) < 1 and float(rows[-1]["tokens_per_s"]) > 0
    assert (tmp_path / "run" / "samples" / "step_00000006.png").is_file()
    pipe = Pipeline.from_pretrained(tmp_path / "run")  # save_pretrained output: generate/chat load it directly
    assert pipe.model.config.backbone.hidden_size == 48
    assert pipe.tokenizer.encode("swatch") == TextTokenizer.load(tmp_path / "run").encode("swatch")


def test_dataset_path_that_does_not_exist_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data.sources.0.kind=image_folder", f"--data.sources.0.path={tmp_path / 'nowhere'}",
              f"--out={tmp_path / 'run'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"image_folder source: {tmp_path / 'nowhere'} is not a directory" in err and "Traceback" not in err


def test_nonfinite_steps_are_skipped_counted_and_bounded(tmp_path, tokenizer, monkeypatch):
    tokenizer.save(tmp_path)
    cfg = micro_config(tmp_path / "run", tmp_path, train={"steps": 6, "max_nonfinite": 3})
    trainer = Trainer(build(TrainConfig, cfg))
    real_loss, calls = trainer.model.loss, []

    def poisoned(batch, generator=None):
        out = real_loss(batch, generator)
        calls.append(1)
        if len(calls) in (2, 4, 5, 6):  # step 2 alone, then steps 4.. in a row
            out["lm_sum"] = out["lm_sum"] * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "loss", poisoned)
    from mmgen.train.data import make_loader

    loader = iter(make_loader(trainer.dataset, trainer.batches, trainer.packer))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step([next(loader)], 0)
    after_first = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train_step([next(loader)], 1)
    assert result["skipped"] == 1.0 and trainer.counters["skipped_steps"] == 1
    assert all(torch.equal(after_first[n], p) for n, p in trainer.model.named_parameters())  # no update
    assert any(not torch.equal(before[n], after_first[n]) for n in before)
    trainer.train_step([next(loader)], 2)
    assert trainer.counters["nonfinite_in_a_row"] == 0
    trainer.train_step([next(loader)], 3)
    trainer.train_step([next(loader)], 4)
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss"):
        trainer.train_step([next(loader)], 5)
    assert trainer.counters["skipped_steps"] == 4


def test_training_reduces_both_losses_and_exports_the_ema(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    cfg = micro_config(tmp_path / "run", tmp_path, data={"sources": [{"kind": "digits"}]},
                       train={"steps": 60, "batch_size": 16}, optim={"lr": 3e-3, "warmup_steps": 5},
                       checkpoint={"every": 0}, log={"every": 20})
    trainer = Trainer(build(TrainConfig, cfg))
    log = read_log(trainer.fit())
    assert [r["step"] for r in log] == [20, 40, 60]
    assert log[-1]["lm"] < log[0]["lm"] * 0.8 and log[-1]["image"] < log[0]["image"]
    exported = load_file(str(tmp_path / "run" / "model.safetensors"))
    shared = [n for n in trainer.ema.shadow if n in exported]  # tied weights are stored once
    assert len(shared) > 10 and all(torch.equal(exported[n], trainer.ema.shadow[n]) for n in shared)


def test_frozen_parameters_are_neither_optimized_nor_averaged(model):
    frozen = model.image.proj_in.weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert all(p is not frozen for g in groups for p in g["params"])
    assert "image.proj_in.weight" not in EMA(model, 0.9).shadow
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.model.embed_tokens.weight) not in decayed and id(model.model.norm.weight) not in decayed


def test_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_train_text_tokenizer_command_keeps_special_tokens_safe(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("hello <boi> world </s> <eoi>\n" * 20 + "the cat sat on the mat\n" * 20)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"segments": [{"text": "interleaved text"}, {"image": "x.png"}]}))
    out = text_tokenizer.main([str(tmp_path / "corpus.txt"), str(tmp_path / "docs.jsonl"), "--out",
                               str(tmp_path / "tok"), "--vocab-size", "300"])
    assert "tokenizer.model" in capsys.readouterr().out
    tok = TextTokenizer.load(out)
    ids = tok.encode("hello <boi> world <eoi> <s> <pad>")
    assert not set(ids) & tok.special_ids  # typed special tokens are ordinary text
    assert tok.decode(tok.encode("interleaved text")) == "interleaved text"
    with pytest.raises(SystemExit):
        text_tokenizer.main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t2")])
    assert "does not exist" in capsys.readouterr().err
