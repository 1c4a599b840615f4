"""Character-level tokenizer: one token per distinct character, ids in sorted order (as in nanoGPT)."""

from __future__ import annotations

import json
from collections.abc import Iterable

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
