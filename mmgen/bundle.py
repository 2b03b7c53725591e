"""`python -m mmgen.bundle RUN_DIR [--out DIR]`: package a trained model as the bundled default.

Checks the output directory of `mmgen train` by loading it (every file, and that the tokenizer
belongs to the model), then copies `config.json` and `tokenizer.model` and writes the weights as
float16 safetensors (half the size; loading casts them back to the model's float32).
The default destination is `mmgen/assets/chat-tiny`, which `Chat.from_pretrained()` and the CLI
load when no model is given. The bundled model was made with

    mmgen train chat-tiny && python -m mmgen.bundle runs/chat-tiny
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmgen.assets import DEFAULT_MODEL
from mmgen.files import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, atomic_write, save_file
from mmgen.pipeline import Pipeline

FILES = (TOKENIZER_FILE, CONFIG_FILE)  # copied as they are, after the weights; config.json last


def bundle(run: str | Path, out: str | Path = DEFAULT_MODEL) -> Path:
    """Write the model of `run` to `out` (config, tokenizer, float16 weights); returns `out`. Nothing is written
    unless `run` loads (FileNotFoundError or ModelFileError naming the bad file otherwise)."""
    run, out = Path(run), Path(out)
    missing = [f for f in (*FILES, WEIGHTS_FILE) if not (run / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run} lacks {missing}: give the output directory of a finished `mmgen train` run")
    Pipeline.from_pretrained(run)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(run / WEIGHTS_FILE))
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, out / WEIGHTS_FILE, metadata={"format": "pt", "source": str(run)})
    for f in FILES:
        atomic_write(out / f, (run / f).read_bytes())
    for f in (WEIGHTS_FILE, *FILES):
        os.chmod(out / f, 0o644)  # readable by all, whatever the umask: the files ship in the package
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m mmgen.bundle RUN_DIR [--out DIR]`; prints the destination and its size."""
    p = argparse.ArgumentParser(prog="python -m mmgen.bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="output directory of `mmgen train`")
    p.add_argument("--out", default=str(DEFAULT_MODEL), help=f"destination (default: {DEFAULT_MODEL})")
    args = p.parse_args(argv)
    out = bundle(args.run, args.out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
