"""`python -m mmgen.bundle RUN_DIR [--out DIR]`: package a trained model as the bundled default.

Checks the output directory of `mmgen train` by loading it (every file, and that the tokenizer
belongs to the model), then writes the weights as float16 safetensors (half the size; loading casts
them back to the model's float32; the tokenizer digest stays in their header), the text tokenizer's
files (`tokenizer.model`, or a pretrained checkpoint's `tokenizer.json` and its companions), the files
the model carries (a vision encoder's config), and `config.json` last.
The default destination is `mmgen/assets/chat-tiny`, which `Chat.from_pretrained()` and the CLI
load when no model is given. The bundled models (`mmgen.assets.BUNDLED`) were made with

    mmgen train chat-tiny && python -m mmgen.bundle runs/chat-tiny
    mmgen train edit-tiny && python -m mmgen.bundle runs/edit-tiny --out mmgen/assets/edit-tiny
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmgen.assets import DEFAULT_MODEL
from mmgen.files import CONFIG_FILE, TOKENIZER_DIGEST, WEIGHTS_FILE, atomic_write, read_weights_metadata, save_file
from mmgen.interfaces.understanding import carried_files
from mmgen.pipeline import Pipeline


def bundle(run: str | Path, out: str | Path = DEFAULT_MODEL) -> Path:
    """Write the model of `run` to `out` (config, tokenizer, float16 weights); returns `out`. Nothing is written
    unless `run` loads (FileNotFoundError or ModelFileError naming the bad file otherwise)."""
    run, out = Path(run), Path(out)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (run / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run} lacks {missing}: give the output directory of a finished `mmgen train` run")
    pipe = Pipeline.from_pretrained(run)
    files = {**pipe.tokenizer.files(), **carried_files(pipe.model.image.understanding)}  # name -> bytes
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(run / WEIGHTS_FILE))
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    digest = read_weights_metadata(run / WEIGHTS_FILE).get(TOKENIZER_DIGEST)
    metadata = {"format": "pt", "source": str(run), **({TOKENIZER_DIGEST: digest} if digest else {})}
    save_file(half, out / WEIGHTS_FILE, metadata=metadata)
    files[CONFIG_FILE] = (run / CONFIG_FILE).read_bytes()  # last: a directory with config.json is complete
    for name, data in files.items():
        atomic_write(out / name, data)
    for name in (WEIGHTS_FILE, *files):
        os.chmod(out / name, 0o644)  # readable by all, whatever the umask: the files ship in the package
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
