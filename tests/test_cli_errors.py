"""Hostile input, broken files, full disks: each failure of the command line is one paragraph on
stderr and exit status 2 (130 for Ctrl-C), never a traceback; bad outputs fail before the model
loads; a full disk leaves no temporary file and the previous checkpoint intact; `--debug` shows the
traceback. Calls go through `mmgen.cli.main` in-process; two run the real `python -m mmgen.cli`."""

from __future__ import annotations

import errno
import io
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from train_helpers import REPO, micro_config, restore_threads, subprocess_env  # noqa: F401 (autouse fixture)

import mmgen.train.state as state_module
from mmgen import cli, files
from mmgen.assets import DEFAULT_MODEL
from mmgen.chat import Chat
from mmgen.chat_repl import run
from mmgen.compare import render_markdown
from mmgen.errors import OutputError
from mmgen.train.checkpoints import CheckpointManager
from mmgen.train.entrypoint import main as train_main


def fails(argv, capsys, code=2) -> str:
    """Run `mmgen ARGV`; assert it exits with `code` and one paragraph on stderr; return stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "\n\n" not in err.strip() and err.strip(), err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: these errors must come first."""
    def load(*args):
        raise AssertionError("the model was loaded before the bad option was reported")

    monkeypatch.setattr(cli, "_load", load)


@pytest.fixture(scope="module")
def chat() -> Chat:
    return Chat.from_pretrained()  # the bundled model


def test_bad_outputs_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model):
    (tmp_path / "file").write_text("x")
    long_name = "x" * 300 + ".png"
    cases = [(tmp_path / "file" / "out.png", "file is a file, not a directory; choose another -o"),
             (tmp_path, "is a directory; give a file name, e.g. -o"),
             (tmp_path / long_name, "this name is 304 bytes long, over the file system's limit of 255"),
             (tmp_path / "out.txt", ".txt is not an image format mmgen can write; end the name in .png")]
    for out, message in cases:
        err = fails(["generate", "a digit", "-o", str(out)], capsys)
        assert err.startswith("error: -o ") and message in err, err

    def no_write(*args, **kwargs):  # what an unwritable directory does (root ignores chmod)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_write)
    err = fails(["generate", "a digit", "-o", str(tmp_path / "ro" / "out.png")], capsys)
    assert f"permission denied while writing {tmp_path}; choose another -o" in err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # nothing was written


@pytest.mark.parametrize("option, value, message", [
    ("-n", "0", "argument -n: must be ≥ 1, got 0"),
    ("--scale", "65", "argument --scale: must be in 1..64, got 65"),
    ("--steps", "x", "argument --steps: 'x' is not an integer"),
    ("--seed", str(2**32), "argument --seed: must be in 0..4294967295"),
    ("--shift", "fast", "argument --shift: give a number or 'auto'"),
])
def test_bad_numbers_are_one_line_errors(option, value, message, capsys, no_model):
    err = fails(["generate", "a digit", option, value], capsys)
    assert err.startswith("error: mmgen generate: ") and message in err and "--help" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--guidance", "nan"], "guidance scale = nan: must be a number in [0, 100]"),
    (["--guidance", "inf"], "guidance scale = inf: must be a number in [0, 100]"),
    (["--steps", "100000"], "image_steps = 100000: must be an integer in [1, 1000]"),
    (["--temperature", "-1"], "temperature = -1.0: must be"),
    (["--top-p", "2"], "top_p = 2.0: must be a number in (0, 1]"),
    (["--eta", "nan"], "eta = nan"),
])
def test_sampling_options_out_of_range_are_named_before_the_model_loads(argv, message, capsys, no_model):
    """A NaN guidance scale once drew an all-black image with exit 0; now every field is checked first."""
    err = fails(["generate", "a digit", *argv], capsys)
    assert err.startswith("error: ") and message in err, err


def test_a_broken_model_directory_is_one_paragraph_and_the_next_call_works(tmp_path, capsys):
    broken = tmp_path / "model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (broken / name).write_bytes((DEFAULT_MODEL / name).read_bytes())
    good = (DEFAULT_MODEL / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(good[: len(good) // 2])  # an interrupted copy
    err = fails(["generate", "a digit", "--model", str(broken), "-o", str(tmp_path / "x.png")], capsys)
    assert "model.safetensors is truncated" in err and str(broken) in err
    assert not (tmp_path / "x.png").exists()
    cli.main(["generate", "a handwritten digit 3", "--steps", "2", "-o", str(tmp_path / "ok.png")])
    assert Image.open(tmp_path / "ok.png").size == (128, 128)


def test_invalid_utf8_prompt_is_an_error(capsys, no_model):
    err = fails(["generate", "digit \udcff"], capsys)  # what Python makes of the byte 0xff in argv
    assert "argument prompt: is not valid UTF-8 (an undecodable byte at character 7)" in err


def test_full_disk_while_saving_an_image_leaves_no_file(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mmgen.files.os.fsync", full)
    out = tmp_path / "img" / "out.png"
    err = fails(["generate", "a digit 3", "--steps", "2", "-o", str(out)], capsys)
    assert f"error: no space left on device while writing {out}; free space or choose another -o" in err
    assert list((tmp_path / "img").iterdir()) == []  # no partial file, no .tmp leftover
    monkeypatch.undo()
    cli.main(["generate", "a digit 3", "--steps", "2", "-o", str(out)])  # the next good call works
    assert capsys.readouterr().out.strip() == str(out) and Image.open(out).size == (128, 128)


def test_caption_prints_the_good_files_and_names_each_bad_one(tmp_path, capsys):
    good = []
    for i in range(2):
        good.append(tmp_path / f"good{i}.png")
        Image.fromarray(np.full((16, 16, 3), 60 + 100 * i, np.uint8)).save(good[-1])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        cli.main(["caption", str(good[0]), str(tmp_path / "bad.png"), str(tmp_path / "gone.png"), str(good[1]),
                  "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in err
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(good[0]), str(good[1])]  # in order
    bad = tmp_path / "bad.png"
    assert err.splitlines() == [
        f"error: {bad}: not a readable image (UnidentifiedImageError: cannot identify image file {str(bad)!r})",
        f"error: {tmp_path / 'gone.png'}: file not found",
        "error: 2 of 4 image file(s) could not be read (each is named above); their captions are missing"]


def test_chat_out_dir_that_is_a_file_and_a_save_that_fails_mid_session(tmp_path, capsys, chat, no_model):
    (tmp_path / "file").write_text("x")
    err = fails(["chat", "--out-dir", str(tmp_path / "file"), "-m", "hi"], capsys)
    assert f"--out-dir {tmp_path / 'file'} is a file, not a directory; choose another --out-dir" in err
    session = run(chat, ["/image a digit 3", "/text hi"], tmp_path / "file", options={"max_new_tokens": 3,
                                                                                      "image_steps": 2})
    out = capsys.readouterr().out
    assert (f"error: a file is in the way while writing {tmp_path / 'file' / 'image_001.png'}; choose another "
            "--out-dir") in out
    assert out.count("mmgen> ") == 2 and session.turn == 2  # the chat went on


def test_invalid_utf8_on_chat_stdin_is_reported_and_the_chat_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe oops\n/text hi\n"), "utf-8"))
    cli.main(["chat", "--out-dir", str(tmp_path), "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert "error: line 2 is not valid UTF-8 (an undecodable byte at character 1)" in out
    assert out.count("mmgen> ") == 2  # lines 1 and 3 were answered
    cli.main(["chat", "--out-dir", str(tmp_path), "--max-new-tokens", "3", "-m", "\udcff", "-m", "/text hi"])
    out = capsys.readouterr().out
    assert "error: line 1 is not valid UTF-8" in out and out.count("mmgen> ") == 1


def test_full_disk_in_a_checkpoint_keeps_the_previous_one(tmp_path, tokenizer, capsys, monkeypatch):
    tokenizer.save(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(micro_config(tmp_path / "run", tmp_path)))  # 4 steps, a checkpoint every 2
    root = tmp_path / "run" / "checkpoints"
    real = state_module.write_json

    def full_at_step_4(target, obj):
        if target.name == "optimizer.json" and "step_00000004" in str(target):
            assert (target.parent / "model.safetensors").is_file()  # partway: some files are written
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, obj)

    monkeypatch.setattr(state_module, "write_json", full_at_step_4)
    with pytest.raises(SystemExit) as e:
        train_main([str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert (f"error: no space left on device while writing checkpoint step 4 to {root}; the previous checkpoint "
            f"{root / 'step_00000002'} is intact: free space and resume with --resume") in err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # no .tmp-step_00000004
    monkeypatch.undo()
    assert train_main([str(path), "--resume"]) == tmp_path / "run"  # resumes from step 2 and finishes
    assert CheckpointManager(root).latest() == root / "step_00000004"

    def full_disk(module, path, metadata=None):  # half a file, then the disk is full
        def write(tmp):
            tmp.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")

        files._replace(path, write)

    monkeypatch.setattr(files, "save_model", full_disk)
    with pytest.raises(SystemExit):  # at step 4 already: only the export runs, and the disk is full
        train_main([str(path), "--resume"])
    assert (f"no space left on device while writing the final model to {tmp_path / 'run'}; the previous checkpoint "
            f"{root / 'step_00000004'} is intact") in capsys.readouterr().err
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


def test_train_output_checked_before_the_data(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = fails(["train", "--out", str(tmp_path / "file" / "run")], capsys)
    assert f"--out {tmp_path / 'file' / 'run'} cannot be written: {tmp_path / 'file'} is a file" in err
    err = fails(["train-tokenizer", "--kind", "vq", "--data", "digits", "--out", str(tmp_path / "file")], capsys)
    assert "--out" in err and "is a file" in err
    err = fails(["compare-tokenizers", "pixels", "--out", str(tmp_path), "--grid", str(tmp_path)], capsys)
    assert f"--grid {tmp_path} is a directory" in err
    err = fails(["train-text-tokenizer", str(REPO / "README.md"), "--out", str(tmp_path / "file")], capsys)
    assert "--out" in err and "is a file" in err


def test_a_typo_in_a_train_key_names_the_closest_key_only(capsys):
    err = fails(["train", "--steps=5"], capsys)
    assert err.startswith("error: unknown config key 'steps'; did you mean 'image_tokenizer.steps' or 'train.steps'? "
                          "(config ")  # the two sections that have it
    assert "keys here" not in err
    err = fails(["train", "--optim.lrr=3"], capsys)
    assert "did you mean 'lr'?" in err and "weight_decay" not in err
    err = fails(["train", "--optim.learning_rate=3"], capsys)  # nothing close: this section's keys, and --help
    assert "no key is close: the keys here are betas, eps, grad_clip, lr," in err and "mmgen train --help" in err


def test_compare_generation_without_the_fwd_packages(tmp_path, monkeypatch, model, tokenizer):
    import mmgen.compare_generation as cg

    monkeypatch.setitem(sys.modules, "pytorchfwd", None)  # as if `pip install pytorchfwd` never ran
    monkeypatch.setitem(sys.modules, "pytorchfwd.freq_math", None)
    monkeypatch.setattr(cg, "generate_digits", lambda pipe, n, options, seed: torch.zeros(10, n, 1, 8, 8))
    monkeypatch.setattr(cg, "caption_accuracy", lambda pipe, data: (0.5, []))  # the slow parts: not tested here
    monkeypatch.setattr(cg, "prompted_accuracy", lambda images, classifier: 0.1)
    model.save_pretrained(tmp_path, tokenizer)
    row = cg.measure(tmp_path, 2, 3.0, 0, classifier=None)
    assert row["gen FWD"] is None and row["caption acc"] == 0.5
    table = render_markdown([{"tokenizer": "pixels", **row}]).splitlines()
    assert table[0].split(" | ")[3] == "gen FWD" and table[2].split(" | ")[3] == "–"  # the column is left empty


def test_debug_keeps_the_traceback_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch, no_model):
    (tmp_path / "file").write_text("x")
    bad = ["generate", "x", "-o", str(tmp_path / "file" / "o.png")]
    for argv in (["--debug", *bad], [*bad, "--debug"]):
        with pytest.raises(OutputError, match="is a file"):
            cli.main(argv)
    monkeypatch.setenv("MMGEN_DEBUG", "1")
    with pytest.raises(OutputError):
        cli.main(bad)
    monkeypatch.delenv("MMGEN_DEBUG")

    def interrupted(directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    assert fails(["generate", "x", "-o", str(tmp_path / "o.png")], capsys, code=130).strip() == "interrupted"
    monkeypatch.setattr(cli, "_load", lambda directory: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # not mmgen's error: a bug, with its traceback
        cli.main(["generate", "x", "-o", str(tmp_path / "o.png")])


def test_end_to_end_exit_status_and_one_paragraph(tmp_path):
    (tmp_path / "file").write_text("x")
    for args in (["generate", "x", "-o", str(tmp_path / "file" / "o.png")], ["generate", b"digit \xff"]):
        done = subprocess.run([sys.executable, "-m", "mmgen.cli", *args], env=subprocess_env(), capture_output=True,
                              cwd=tmp_path, timeout=120, check=False)
        err = done.stderr.decode()
        assert done.returncode == 2 and err.startswith("error: ") and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
