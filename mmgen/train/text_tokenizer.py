"""`mmgen train-text-tokenizer CORPUS... --out DIR`: a SentencePiece model trained on your own text.

CORPUS items are .txt files or folders of them (one sentence or paragraph per line), JSONL files
(the "text" / "caption" strings of each line, and the text segments of interleaved documents), or
a training config (YAML / JSON) whose data sources supply the text. mmgen's special tokens
(<bos>, <boi>, <eoi>, ...) are control symbols: text that spells them never becomes them.
Use the result with `mmgen train CONFIG --tokenizer.path=DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from mmgen.data.sources import DataError


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
            from mmgen.train.config import load_config, resolve_model
            from mmgen.train.data import corpus
            from mmgen.data.sources import build_source

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


def main(argv: list[str] | None = None) -> Path:
    """Train and save the tokenizer; returns the output directory."""
    from mmgen.tokenizers.text import FILENAME, TextTokenizer
    from mmgen.train.overrides import ConfigError

    p = argparse.ArgumentParser(prog="mmgen train-text-tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", nargs="+", help=".txt / .jsonl files, folders of them, or a training config")
    p.add_argument("--out", required=True, help="output directory (gets tokenizer.model)")
    p.add_argument("--vocab-size", type=int, default=4096, help="upper bound on pieces (small corpora give fewer)")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-texts", type=int, default=1_000_000, help="texts used at most")
    args = p.parse_args(argv)
    try:
        texts = corpus_texts(args.corpus, args.max_texts)
        tok = TextTokenizer.train(texts, vocab_size=args.vocab_size, model_type=args.model_type)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"{out / FILENAME}: {len(tok)} pieces from {len(texts)} texts; train with --tokenizer.path={out}")
    return out


if __name__ == "__main__":
    main()
