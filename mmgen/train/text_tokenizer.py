"""`mmgen train-text-tokenizer CORPUS... --out DIR`: a SentencePiece model trained on your own text.

CORPUS items are .txt files or folders of them (one sentence or paragraph per line), JSONL files
(the "text" / "caption" strings of each line, and the text segments of interleaved documents), or
a training config (YAML / JSON) whose data sources supply the text. mmgen's special tokens
(<bos>, <boi>, <eoi>, ...) are control symbols: text that spells them never becomes them.
Use the result with `mmgen train CONFIG --tokenizer.path=DIR`. `run_tokenizer` is the tokenizer
of a training run: the resumed checkpoint's, the `model.init_from` checkpoint's (a Hugging Face one,
`mmgen.tokenizers.hf_text`), `tokenizer.path`, or one trained at start like this.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from mmgen.data.source import Source
from mmgen.errors import ConfigError, DataError
from mmgen.files import TOKENIZER_FILE, atomic_write
from mmgen.tokenizers.hf_text import HF_TOKENIZER_FILE
from mmgen.tokenizers.text import TextTokenizer
from mmgen.tokenizers.text_contract import TextTokenizerContract, load_text_tokenizer
from mmgen.train.data import corpus
from mmgen.train.init_from import init_tokenizer


def jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            segs = rec.get("segments") if isinstance(rec, dict) and "segments" in rec else rec
            for s in segs if isinstance(segs, list) else [segs]:
                if isinstance(s, str):
                    yield s
                elif isinstance(s, dict):
                    yield from (s[k] for k in ("text", "caption") if isinstance(s.get(k), str))


def corpus_texts(items: list[str], max_texts: int) -> list[str]:
    """Non-empty texts from files, folders and training configs, at most `max_texts`."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.suffix in (".yaml", ".yml", ".json"):
            from mmgen.data.sources import build_source
            from mmgen.train.config import load_config, resolve_model

            cfg = load_config(item)
            img = resolve_model(cfg.model)[0].image
            sources = [build_source(s, seed=cfg.seed, channels=img.channels, resolution=img.resolution,
                                    max_chars=10_000) for s in cfg.data.sources]
            out += corpus(sources, max_texts)
            continue
        if not p.exists():
            raise DataError(f"corpus item {p} does not exist")
        files = sorted(p.rglob("*.txt")) + sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
        for f in files:
            if f.suffix == ".jsonl":
                out += [t for t in jsonl_texts(f) if t.strip()]
            else:
                out += [line for line in f.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not out:
        raise DataError(f"no text found in {items}")
    return out[:max_texts]


def run_tokenizer(section, sources: list[Source], out: Path, resume_dir: Path | None, main: bool,
                  barrier: Callable[[], None], init_from: str | None = None) -> TextTokenizerContract:
    """The text tokenizer of a training run: the resumed checkpoint's, else the `init_from` checkpoint's,
    else `tokenizer.path`'s, else one trained on the main process from the sources' text and written
    atomically to OUT/tokenizer.model.

    Args:
        section: the config's `TokenizerSection`.
        main: whether this is the main process (the one that trains and writes).
        barrier: waits for every process (the others read the file once the main one has written it).
        init_from: `model.init_from`, a Hugging Face checkpoint directory (no tokenizer is trained).
    Raises:
        ConfigError: `init_from` with `tokenizer.path` (the checkpoint brings its own), or a bad path.
    """
    if resume_dir and any((resume_dir / f).is_file() for f in (TOKENIZER_FILE, HF_TOKENIZER_FILE)):
        return load_text_tokenizer(resume_dir)
    if init_from:
        if section.path:
            raise ConfigError(f"tokenizer.path = {section.path!r} with model.init_from: the checkpoint's own tokenizer "
                              "is used (its embedding rows belong to it); remove tokenizer.path")
        return init_tokenizer(init_from)
    if section.path:
        p = Path(section.path)
        path = p / TOKENIZER_FILE if p.is_dir() else p
        if not path.is_file():
            raise ConfigError(f"tokenizer.path: {path} does not exist (train one with `mmgen train-text-tokenizer`)")
        try:
            return TextTokenizer(path.read_bytes())
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"tokenizer.path: {path}: {e}") from None
    if main:
        texts = corpus(sources, section.max_texts)
        tok = TextTokenizer.train(texts, vocab_size=section.vocab_size, model_type=section.model_type)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / TOKENIZER_FILE, tok.model_proto)
    barrier()
    return TextTokenizer.load(out)


def main(argv: list[str] | None = None, debug: bool = False) -> Path:
    """Train and save the tokenizer; returns the output directory. Errors print one paragraph and exit
    with status 2 (`mmgen.outputs.exit_on_error`); `debug` or `--debug` keeps their traceback."""
    from mmgen.outputs import exit_on_error

    p = argparse.ArgumentParser(prog="mmgen train-text-tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", nargs="+", help=".txt / .jsonl files, folders of them, or a training config")
    p.add_argument("--out", required=True, help="output directory (gets tokenizer.model)")
    p.add_argument("--vocab-size", type=int, default=4096, help="upper bound on pieces (small corpora give fewer)")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-texts", type=int, default=1_000_000, help="texts used at most")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also MMGEN_DEBUG=1)")
    args = p.parse_args(argv)
    return exit_on_error(lambda: _train(args), debug or args.debug)


def _train(args: argparse.Namespace) -> Path:
    from mmgen.outputs import check_output_dir

    out = check_output_dir(args.out, "--out")
    texts = corpus_texts(args.corpus, args.max_texts)
    tok = TextTokenizer.train(texts, vocab_size=args.vocab_size, model_type=args.model_type)
    tok.save(out)
    print(f"{out / TOKENIZER_FILE}: {len(tok)} pieces from {len(texts)} texts; train with --tokenizer.path={out}")
    return out
