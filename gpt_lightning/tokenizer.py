"""Tokenizers behind one small interface (encode, decode, check, to_dict): characters, one token each with ids
in sorted order (as in nanoGPT, the default), and byte-level BPE from a Hugging Face `tokenizer.json`
(GPT-2's), through the `tokenizers` library, imported where it is used (the `hf` extra)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch


class CharTokenizer:
    def __init__(self, vocab: Iterable[str]) -> None:
        chars = list(vocab)
        if not chars:
            raise ValueError("the vocabulary is empty: build it from non-empty text.")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("a character vocabulary must list distinct single characters.")
        self.vocab: str = "".join(chars)
        self._id_of = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - self._id_of.keys())

    def check(self, text: str, what: str = "text") -> None:
        """Raises a ValueError that lists the characters of `text` the vocabulary lacks."""
        unknown = self.unknown_chars(text)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise ValueError(
                f"{what} has {len(unknown)} character(s) outside the model's {self.vocab_size}-character "
                f"vocabulary: {shown}. Remove or replace them."
            )

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (len(text),) as int64."""
        self.check(text)
        return torch.tensor([self._id_of[c] for c in text], dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.vocab[i] for i in ids)

    def to_dict(self) -> dict[str, str]:
        return {"type": "char", "vocab": self.vocab}

    @classmethod
    def from_dict(cls, state: dict[str, str]) -> CharTokenizer:
        if state.get("type") != "char" or not isinstance(state.get("vocab"), str):
            raise ValueError(f"not a character tokenizer state: {sorted(state)}")
        return cls(state["vocab"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> CharTokenizer:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.vocab == self.vocab

    def __hash__(self) -> int:
        return hash(self.vocab)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer:
    """Byte-level BPE as a Hugging Face `tokenizer.json` defines it (GPT-2's, for one). The JSON travels in
    checkpoints, so a checkpoint alone can encode and decode."""

    def __init__(self, tokenizer_json: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError("BPE tokenizers need the tokenizers library: pip install -e '.[hf]'") from err
        self.tokenizer_json = tokenizer_json
        self._tokenizer = Tokenizer.from_str(tokenizer_json)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def check(self, text: str, what: str = "text") -> None:
        """Byte-level BPE encodes any text."""

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict[str, str]:
        return {"type": "bpe", "tokenizer_json": self.tokenizer_json}

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_dict(state: dict[str, str]) -> Tokenizer:
    """The tokenizer a checkpoint recorded (`to_dict`)."""
    if state.get("type") == "bpe":
        return BPETokenizer(state["tokenizer_json"])
    return CharTokenizer.from_dict(state)


class StreamDecoder:
    """Text of a growing sequence of token ids, piece by piece, never splitting a character: a byte-level
    BPE token can end in the middle of a multi-byte UTF-8 character, which the next token completes. Each
    `push` returns the text that became whole. Only the ids since the last whole character are decoded
    again (for characters and byte-level BPE, text splits at character boundaries), so a long sample
    costs linear time."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []  # ids whose text ends in an incomplete character

    def push(self, ids: Iterable[int]) -> str:
        self.pending.extend(ids)
        text = self.tokenizer.decode(self.pending)
        if text.endswith(INCOMPLETE):  # an incomplete character decodes to U+FFFD: wait for its next byte
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tokenizer.decode(self.pending), []
        return text


INCOMPLETE = "\ufffd"
