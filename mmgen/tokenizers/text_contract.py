"""The text-tokenizer contract: what the sequence builder, chat template, pipeline, chat, CLI and trainer use.

Two kinds implement it: mmgen's SentencePiece `TextTokenizer` (`tokenizer.model`) and `HFTextTokenizer`, a
pretrained checkpoint's Hugging Face tokenizer (`tokenizer.json`) with mmgen's control tokens appended as
new ids. Whatever the kind, text never produces a special or control id, the files it saves identify it
(`digest`, recorded in the weights' header), and `load_text_tokenizer` picks the kind by the files present.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from mmgen.files import TOKENIZER_FILE
from mmgen.tokenizers.hf_text import HF_TOKENIZER_FILE, HFTextTokenizer
from mmgen.tokenizers.text import TextTokenizer


class TextTokenizerContract(Protocol):
    """A text tokenizer as mmgen uses it.

    Ids: `bos_id`, `eos_id`, `pad_id`, `unk_id` (the engine never samples pad, bos or unk); mmgen's control
    ids `boi_id`, `eoi_id`, `user_id`, `assistant_id`, `end_id` (`mmgen.config.CONTROL_TOKENS`); `special_ids`
    holds every id that is not text (dropped by `decode`). `len(tokenizer)` is the vocabulary the model's
    embedding must cover.
    """

    kind: str  # "sentencepiece" or "hf"
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    boi_id: int
    eoi_id: int
    user_id: int
    assistant_id: int
    end_id: int
    special_ids: frozenset[int]

    def __len__(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; never a special or control id, whatever the text spells."""

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; special and control ids are dropped."""

    def files(self) -> dict[str, bytes]:
        """The files that `save` writes (name -> bytes); together they rebuild this tokenizer."""

    def digest(self) -> str:
        """SHA-256 of `files()` (`mmgen.files.files_digest`): which tokenizer the weights were saved with."""

    def save(self, directory: str | Path) -> None:
        """Write `files()` into `directory`, each atomically."""

    def hf_files(self) -> dict[str, bytes]:
        """The tokenizer as `transformers.AutoTokenizer` loads it (for `mmgen export-hf`), without mmgen's
        record; its vocabulary is the first `hf_vocab_size` ids."""

    @property
    def hf_vocab_size(self) -> int:
        """Rows of the embedding that `hf_files` covers (the exported model keeps these)."""


def load_text_tokenizer(directory: str | Path) -> TextTokenizerContract:
    """The text tokenizer saved in `directory`: a Hugging Face one when `tokenizer.json` is there (with
    mmgen's record of its appended ids, `mmgen_text_tokenizer.json`, if it has one), else mmgen's
    SentencePiece `tokenizer.model`.

    Raises:
        FileNotFoundError: neither file is there (the message names both).
        ModelFileError: the file is corrupt or not a tokenizer mmgen can use (the message names it and the fix).
    """
    d = Path(directory)
    if (d / HF_TOKENIZER_FILE).is_file():
        return HFTextTokenizer.load(d)
    if (d / TOKENIZER_FILE).is_file():
        return TextTokenizer.load(d)
    raise FileNotFoundError(f"{d / TOKENIZER_FILE} not found (nor {d / HF_TOKENIZER_FILE}): the model directory has "
                            "no text tokenizer; copy the tokenizer files saved with the model into it")

