"""SentencePiece text tokenizer trained by mmgen, with special tokens safe from injection.

Ids 0..3 are <pad> <unk> <bos> <eos>; then `CONTROL_TOKENS` (<boi>, <eoi>, role markers) as
SentencePiece control symbols, which are never produced from text: a user who types "<boi>"
gets ordinary pieces. Byte fallback means no text is ever <unk>. It implements the text-tokenizer
contract (`mmgen.tokenizers.text_contract`); its digest is the SHA-256 of `tokenizer.model`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from mmgen.config import CONTROL_TOKENS
from mmgen.errors import ModelFileError
from mmgen.files import TOKENIZER_FILE, atomic_write, files_digest

HF_CONFIG = {  # for transformers' LlamaTokenizer: mmgen's ids are <pad> 0, <unk> 1, <s> 2, </s> 3
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
}


class TextTokenizer:
    """A SentencePiece model plus the special ids mmgen needs.

    Args:
        model_proto: the bytes of a `tokenizer.model` trained by `TextTokenizer.train`.
        source: how errors name where the bytes came from (`load` gives the file's path).
    Raises:
        ModelFileError: the bytes are empty, not a SentencePiece model, or one not trained by mmgen
            (a control token missing, or other ids for <pad> <unk> <s> </s>).
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "the SentencePiece model"):
        fix = "use the tokenizer.model saved with the model, or train one with `mmgen train-text-tokenizer`"
        if not model_proto:
            raise ModelFileError(f"{source} is empty (0 bytes); {fix}")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            raise ModelFileError(f"{source} is not a SentencePiece model (corrupt or truncated?); {fix}") from None
        self.model_proto = model_proto
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = 0, 1, 2, 3
        ids = {tok: self.sp.piece_to_id(tok) for tok in CONTROL_TOKENS}
        missing = [tok for tok, i in ids.items() if i == self.unk_id or not self.sp.is_control(i)]
        specials = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        wrong = ([f"it lacks the control tokens {missing}"] if missing else []) + (
            [f"its ids of <pad> <unk> <s> </s> are {specials}, not (0, 1, 2, 3)"] if specials != (0, 1, 2, 3) else [])
        if wrong:
            raise ModelFileError(f"{source} was not trained by mmgen: {' and '.join(wrong)}; {fix}")
        self.boi_id, self.eoi_id = ids["<boi>"], ids["<eoi>"]
        self.user_id, self.assistant_id, self.end_id = ids["<|user|>"], ids["<|assistant|>"], ids["<|end|>"]
        self.special_ids = frozenset([self.pad_id, self.bos_id, self.eos_id, *ids.values()])

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int = 512, model_type: str = "bpe") -> TextTokenizer:
        """Train a tokenizer on an iterable of sentences.

        Args:
            corpus: training text, one sentence or line per item.
            vocab_size: upper bound on the vocabulary (smaller corpora give fewer pieces; 256 byte
                pieces and the special tokens are included).
            model_type: "bpe" or "unigram".
        """
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            control_symbols=list(CONTROL_TOKENS),
            byte_fallback=True,
            hard_vocab_limit=False,
            character_coverage=1.0,
            split_digits=True,
            num_threads=1,
            minloglevel=2,
        )
        return cls(buf.getvalue())

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; never yields a special id."""
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; special ids are dropped."""
        return self.sp.decode([i for i in ids if i not in self.special_ids])

    def files(self) -> dict[str, bytes]:
        """{"tokenizer.model": the SentencePiece model proto}."""
        return {TOKENIZER_FILE: self.model_proto}

    def digest(self) -> str:
        """SHA-256 of the model proto."""
        return files_digest(self.files())

    def save(self, directory: str | Path) -> None:
        """Write `directory`/tokenizer.model (the SentencePiece model proto), atomically."""
        atomic_write(Path(directory, TOKENIZER_FILE), self.model_proto)

    def hf_files(self) -> dict[str, bytes]:
        """tokenizer.model + a tokenizer_config.json for transformers' LlamaTokenizer (loading it needs
        sentencepiece and protobuf). It adds <s> first, as mmgen's sequences start; unlike mmgen it does not
        apply NFKC and matches <boi>, <|user|>, ... in text (they are its special tokens)."""
        config = json.dumps(HF_CONFIG, indent=2) + "\n"
        return {TOKENIZER_FILE: self.model_proto, "tokenizer_config.json": config.encode("utf-8")}

    @property
    def hf_vocab_size(self) -> int:
        """Every piece: the control tokens are part of the SentencePiece model."""
        return len(self)

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        """The tokenizer saved in `directory`/tokenizer.model; raises FileNotFoundError naming the file if it is
        absent, ModelFileError naming it if it is empty, corrupt or not an mmgen tokenizer."""
        path = Path(directory, TOKENIZER_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the model directory has no text tokenizer; copy the "
                                    "tokenizer.model saved with the model into it")
        return cls(path.read_bytes(), source=str(path))
