"""A pretrained checkpoint's Hugging Face tokenizer as mmgen's text tokenizer, never downloaded.

It reads a local `tokenizer.json` (with `tokenizer_config.json` / `special_tokens_map.json` when present,
for the names of <bos> <eos> <pad> <unk>) through the `tokenizers` library. mmgen's control tokens
(`CONTROL_TOKENS`: <boi>, <eoi>, role markers) are appended as new ids after the checkpoint's vocabulary
(`base_size`: the larger of the tokenizer's size and the checkpoint's embedding rows), and are never
registered with the Hugging Face tokenizer: no text can produce them. Its own special tokens (<s>,
<|endoftext|>, <|im_start|>, ...) are split as ordinary text (`encode_special_tokens`), so text that spells
them never becomes them either. bos / eos are the checkpoint's; a missing one is appended, and so is bos
when it equals eos, and pad when the checkpoint has none or it equals eos (the generation engine never
samples pad or bos: sharing an id with eos would stop the model from ending). `save` writes the original
tokenizer files plus `mmgen_text_tokenizer.json`, the record of the appended ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from mmgen.config import CONTROL_TOKENS
from mmgen.errors import ModelFileError
from mmgen.files import atomic_write, files_digest, parse_json_object

HF_TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face (`tokenizers`) tokenizer
HF_RECORD_FILE = "mmgen_text_tokenizer.json"  # which ids mmgen appended to it
CARRIED_FILES = (HF_TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")  # saved as they are
RECORD_FORMAT = "mmgen-hf-text-tokenizer/1"
ROLES = ("bos", "eos", "pad", "unk")


def _json(data: bytes, source: str) -> dict:
    return parse_json_object(data, source, "copy the file saved with the model or the checkpoint again")


def _named_specials(files: dict[str, bytes], where: str) -> dict[str, str | None]:
    """role -> the token string tokenizer_config.json (else special_tokens_map.json) names for it, or None."""
    names: dict[str, str | None] = dict.fromkeys(ROLES)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if name not in files:
            continue
        cfg = _json(files[name], f"{where}/{name}")
        for role in ROLES:
            value = cfg.get(f"{role}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) or (name == "tokenizer_config.json" and f"{role}_token" in cfg):
                names[role] = value if isinstance(value, str) else None
    return names


class HFTextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids mmgen appends (the contract: `mmgen.tokenizers.text_contract`).

    Args:
        files: name -> bytes: `tokenizer.json` (required), `tokenizer_config.json`, `special_tokens_map.json`.
        base_size: the first appended id is at least this (the checkpoint's embedding rows, which may
            exceed the tokenizer's size); 0: the tokenizer's size.
        source: how errors name where the files came from (a directory).
    Raises:
        ModelFileError: tokenizer.json is missing, corrupt or not a `tokenizers` file, or a config is not JSON.
    """

    kind = "hf"

    def __init__(self, files: dict[str, bytes], base_size: int = 0, source: str = "the tokenizer directory"):
        if HF_TOKENIZER_FILE not in files:
            raise ModelFileError(f"{source} has no {HF_TOKENIZER_FILE}: save the checkpoint's tokenizer with "
                                 "transformers (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) to write one")
        try:
            self.tk = Tokenizer.from_str(files[HF_TOKENIZER_FILE].decode("utf-8"))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for malformed files)
            raise ModelFileError(f"{source}/{HF_TOKENIZER_FILE} is not a Hugging Face tokenizer file "
                                 f"(corrupt or truncated? {str(e)[:120]}); copy it again") from None
        self.original = {k: files[k] for k in CARRIED_FILES if k in files}
        self.tk.encode_special_tokens = True  # the checkpoint's special tokens typed in text stay text
        self.tk.no_truncation()
        self.tk.no_padding()
        self.own_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.base_size = max(self.own_size, base_size)
        named = _named_specials(files, source)
        own = {role: self.tk.token_to_id(tok) if tok else None for role, tok in named.items()}
        appended = list(CONTROL_TOKENS)
        appended += ["<bos>"] * (own["bos"] is None or own["bos"] == own["eos"]) + ["<eos>"] * (own["eos"] is None)
        appended += ["<pad>"] * (own["pad"] is None or own["pad"] == own["eos"])
        self.appended = {tok: self.base_size + i for i, tok in enumerate(appended)}
        self.bos_id = self.appended.get("<bos>", own["bos"])
        self.eos_id = self.appended.get("<eos>", own["eos"])
        self.pad_id = self.appended.get("<pad>", own["pad"])
        self.unk_id = self.pad_id if own["unk"] is None else own["unk"]
        self.boi_id, self.eoi_id = self.appended["<boi>"], self.appended["<eoi>"]
        self.user_id, self.assistant_id = self.appended["<|user|>"], self.appended["<|assistant|>"]
        self.end_id = self.appended["<|end|>"]
        own_special = [i for i, t in self.tk.get_added_tokens_decoder().items() if t.special]
        self.special_ids = frozenset([*own_special, *self.appended.values(), self.bos_id, self.eos_id, self.pad_id])

    def __len__(self) -> int:
        return self.base_size + len(self.appended)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids of the checkpoint's vocabulary; never a special or appended id."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; special, appended and out-of-vocabulary ids are dropped."""
        return self.tk.decode([i for i in ids if i not in self.special_ids and 0 <= i < self.own_size],
                              skip_special_tokens=True)

    def record(self) -> dict:
        """What `mmgen_text_tokenizer.json` holds: the first appended id and every appended token's id."""
        return {"format": RECORD_FORMAT, "base_size": self.base_size, "appended": self.appended}

    def files(self) -> dict[str, bytes]:
        """The original tokenizer files and `mmgen_text_tokenizer.json`."""
        record = json.dumps(self.record(), indent=2, sort_keys=True) + "\n"
        return {**self.original, HF_RECORD_FILE: record.encode("utf-8")}

    def digest(self) -> str:
        """SHA-256 of every file (`mmgen.files.files_digest`)."""
        return files_digest(self.files())

    def save(self, directory: str | Path) -> None:
        """Write `files()` into `directory`, each atomically."""
        for name, data in self.files().items():
            atomic_write(Path(directory, name), data)

    def hf_files(self) -> dict[str, bytes]:
        """The checkpoint's original tokenizer files."""
        return dict(self.original)

    @property
    def hf_vocab_size(self) -> int:
        """The checkpoint's rows (`base_size`): the appended ones are mmgen's."""
        return self.base_size

    @classmethod
    def load(cls, directory: str | Path, base_size: int = 0) -> HFTextTokenizer:
        """The tokenizer files in `directory`: a model directory saved by mmgen (its record fixes the appended
        ids, and is checked against them) or a Hugging Face checkpoint (ids appended after `base_size`).

        Raises:
            ModelFileError: a file is corrupt, or the record does not match the tokenizer (the message names it).
        """
        d = Path(directory)
        files = {name: (d / name).read_bytes() for name in CARRIED_FILES if (d / name).is_file()}
        if not (d / HF_RECORD_FILE).is_file():
            return cls(files, base_size, str(d))
        record = _json((d / HF_RECORD_FILE).read_bytes(), str(d / HF_RECORD_FILE))
        if record.get("format") != RECORD_FORMAT or not isinstance(record.get("base_size"), int):
            raise ModelFileError(f"{d / HF_RECORD_FILE} is not a record mmgen wrote (format {RECORD_FORMAT!r} with "
                                 "base_size); copy the one saved with the model")
        tok = cls(files, record["base_size"], str(d))
        if tok.record() != record:
            raise ModelFileError(f"{d / HF_RECORD_FILE} records the appended ids {record.get('appended')}, but "
                                 f"{d / HF_TOKENIZER_FILE} gives {tok.appended}: the tokenizer files are not the ones "
                                 "saved with the model; copy them all again from the same directory")
        return tok
