"""Tokenizers behind one small interface (encode, decode, check, to_dict, characters_per_token, bytes_per_token):
characters, one token each with ids in sorted order (as in nanoGPT, the default), and byte-level BPE from a Hugging
Face `tokenizer.json` (GPT-2's), through the `tokenizers` library, imported where it is used (the `hf` extra)."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from gpt_lightning.hub import hf_gpt2_folder


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

    def grown(self, text: str) -> CharTokenizer:
        """This vocabulary with the characters of `text` it lacks appended, sorted: every old id keeps its
        character, and the new ones come after them (data.grow_vocab)."""
        return CharTokenizer(self.vocab + "".join(self.unknown_chars(text)))

    def extends(self, other: Tokenizer) -> bool:
        """Whether this vocabulary is `other`'s with more characters appended (what `grown` makes)."""
        return (
            isinstance(other, CharTokenizer)
            and len(self.vocab) > len(other.vocab)
            and self.vocab.startswith(other.vocab)
        )

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

    def characters_per_token(self) -> torch.Tensor:
        """(vocab_size,): one character each."""
        return torch.ones(self.vocab_size)

    def bytes_per_token(self) -> torch.Tensor:
        """(vocab_size,): the UTF-8 bytes of each character, so that a loss summed over tokens becomes bits per byte."""
        return torch.tensor([len(c.encode("utf-8")) for c in self.vocab], dtype=torch.float)

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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text, encoded by the library's threads together (in Rust, one per core, unless
        TOKENIZERS_PARALLELISM is false or this process was forked after the library used them: see
        docs/your-own-data.md). Ids alone: the library then skips the offsets it would track for every
        token, which makes the token cache 1.3x faster (benchmarks/gpt2_cpu.py)."""
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def encode_pieces(self, pieces: Iterable[str]) -> Iterator[np.ndarray]:
        """The ids of the text that `pieces` stream, exactly as `encode(whole text)` gives them, without
        holding the text whole (the token cache encodes corpora of any size with it). The text is cut about
        every SEGMENT_CHARS characters where the tokenizer itself ends a pre-token (see `_cut_after`), so any
        text is cut: without line breaks, with CRLF ones, indented, in any script, for GPT-2's pre-tokenizer
        regex or GPT-4's. Each cut is proved on the text around it: the ids of the two sides, encoded apart,
        must be those of encoding them together, so a tokenizer that adds a prefix to every input is cut only
        where that prefix changes nothing (before a space, for add_prefix_space). The segments are encoded
        in order, in batches of at most BATCH_CHARS characters (a longer segment alone), each by the
        library's threads: the memory of an encoding is that of one batch, whatever the size of a piece.
        Text with no such place for MAX_UNCUT_CHARS characters is an error, never one call that would take
        gigabytes (about 180 bytes per character)."""
        yield from self._encode_in_batches(self._segments(pieces))

    def _segments(self, pieces: Iterable[str]) -> Iterator[str]:
        """The text that `pieces` stream, cut where `_cuts` proves it can be."""
        pending, done = "", 0  # done: characters before `pending`, for the error
        for piece in pieces:
            pending += piece
            if len(pending) < 4 * SEGMENT_CHARS:
                continue
            cuts, rejected = self._cuts(pending, final=False)
            if cuts:
                yield from (pending[a:b] for a, b in itertools.pairwise([0, *cuts]))
                pending, done = pending[cuts[-1] :], done + cuts[-1]
            if len(pending) > MAX_UNCUT_CHARS:
                raise self._uncuttable(done, rejected)
        cuts, _ = self._cuts(pending, final=True)
        yield from (pending[a:b] for a, b in itertools.pairwise([0, *cuts, len(pending)]) if a < b)

    def _encode_in_batches(self, segments: Iterable[str]) -> Iterator[np.ndarray]:
        """The ids of each segment, in order, encoded in batches of at most BATCH_CHARS characters (a longer
        segment alone)."""
        batch, size = list[str](), 0
        for segment in segments:
            if batch and size + len(segment) > BATCH_CHARS:
                yield from self.encode_batch(batch)
                batch, size = [], 0
            batch.append(segment)
            size += len(segment)
        if batch:
            yield from self.encode_batch(batch)

    def _cuts(self, text: str, final: bool) -> tuple[list[int], int]:
        """Where `encode_pieces` cuts `text`: a proven cut about every SEGMENT_CHARS characters (a `final`
        text may be cut up to its end; otherwise SEAM_CHARS before it, which later text may still change),
        and how many pre-token boundaries failed the proof since the last cut."""
        cuts: list[int] = []
        start, rejected = 0, 0
        while True:
            cut, rejected = self._cut_after(text, start + SEGMENT_CHARS, final)
            if cut is None:
                return cuts, rejected
            cuts.append(start := cut)

    def _cut_after(self, text: str, position: int, final: bool) -> tuple[int | None, int]:
        """The first place at or after `position` where `text` can be cut without changing its ids, and how
        many candidates failed. The tokenizer's own encoding of a window of text says where its pre-tokens
        begin (whatever its normalizer and pre-tokenizer), in characters of the text; a candidate lies at
        least SEAM_CHARS inside the window on each side, and is taken when the two sides of the window,
        encoded apart, give the window's ids."""
        rejected = 0
        while position < len(text) - (0 if final else SEAM_CHARS):
            lo, hi = max(position - SEAM_CHARS, 0), min(position + CUT_WINDOW_CHARS + SEAM_CHARS, len(text))
            last = hi if final and hi == len(text) else hi - SEAM_CHARS  # the right side keeps SEAM_CHARS
            window = self._tokenizer.encode(text[lo:hi], add_special_tokens=False)
            ids, words, offsets, tried = window.ids, window.word_ids, window.offsets, 0
            for i in range(1, len(ids)):
                cut = lo + offsets[i][0]
                if words[i] == words[i - 1] or cut < position or cut == lo + offsets[i - 1][0]:
                    continue  # inside a pre-token, before the wanted place, or inside a character's bytes
                if cut >= min(position + CUT_WINDOW_CHARS, last) or tried == CUT_TRIES_PER_WINDOW:
                    break
                left, right = self.encode_batch([text[lo:cut], text[cut:hi]])
                if left.tolist() + right.tolist() == ids:
                    return cut, rejected
                tried += 1
                rejected += 1
            position += CUT_WINDOW_CHARS
        return None, rejected

    def _uncuttable(self, position: int, rejected: int) -> ValueError:
        if rejected:
            why = (
                f"it ends pre-tokens there, but at each of the {rejected:,} places tried its ids change when the "
                "text is cut there (it may add a prefix to every input), so the text cannot be encoded in pieces"
            )
        else:
            why = "it finds no place between two of its tokens there (one pre-token that long)"
        return ValueError(
            f"the text holds more than {MAX_UNCUT_CHARS:,} characters, from character {position:,} on, that this "
            f"tokenizer cannot cut: {why}. Encoding them in one call would take gigabytes of memory. Break the "
            "text up (spaces or line breaks), or use a byte-level BPE such as GPT-2's."
        )

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict[str, str]:
        return {"type": "bpe", "tokenizer_json": self.tokenizer_json}

    @cached_property
    def fingerprint(self) -> str:
        """What identifies the tokenizer: the sha256 of its JSON with sorted keys, so that two copies of one
        tokenizer.json written differently (indented or not) are the same tokenizer."""
        canonical = json.dumps(json.loads(self.tokenizer_json), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def characters_per_token(self) -> torch.Tensor:
        """(vocab_size,): how many characters of text each token stands for, so that a loss summed over
        tokens becomes bits per character. A byte-level token may hold part of a multi-byte character: it
        counts the characters that start in it (UTF-8 bytes that are not continuation bytes), so the counts
        of a sequence add up to its length in characters."""
        byte_of = {char: byte for byte, char in enumerate(_byte_level_alphabet())}
        added = {token.content for token in self._tokenizer.get_added_tokens_decoder().values()}
        counts = torch.zeros(self.vocab_size)
        for token, i in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token not in added and all(c in byte_of for c in token):  # a byte-level token: GPT-2's kind
                counts[i] = sum(byte_of[c] & 0xC0 != 0x80 for c in token)
            else:
                counts[i] = len(self._tokenizer.decode([i], skip_special_tokens=False))
        return counts

    def bytes_per_token(self) -> torch.Tensor:
        """(vocab_size,): how many bytes of UTF-8 text each token stands for (a byte-level token writes one
        character per byte), so that a loss summed over tokens becomes bits per byte on any tokenizer's scale."""
        byte_level = set(_byte_level_alphabet())
        added = {token.content for token in self._tokenizer.get_added_tokens_decoder().values()}
        counts = torch.zeros(self.vocab_size)
        for token, i in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token not in added and all(c in byte_level for c in token):
                counts[i] = len(token)
            else:
                counts[i] = len(self._tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
        return counts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


SEGMENT_CHARS = 1 << 16  # text between two cuts: the windows that place the cuts take 3% of the time
# Text encoded per call: 16 segments for the library's threads to share. Tiny Shakespeare x10 peaks 80 MB
# above the process's start this way, 170 MB in batches of 4 MB (210 MB with offsets, as before 2026-12-04),
# at most 5% faster.
BATCH_CHARS = 1 << 20
SEAM_CHARS = 256  # the text on each side of a cut that proves it
CUT_WINDOW_CHARS = 256  # the candidate cuts looked at per encoding of a window
CUT_TRIES_PER_WINDOW = 8  # candidates proved per window, at most: a tokenizer that cannot be cut costs little
MAX_UNCUT_CHARS = 1 << 21  # text without a cut that is an error: one call takes about 180 bytes per character


def _byte_level_alphabet() -> list[str]:
    """The printable character GPT-2's byte-level BPE writes for each byte 0..255 (its `bytes_to_unicode`):
    printable Latin-1 bytes stand for themselves; the others are shifted past 255 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


Tokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_dict(state: dict[str, str]) -> Tokenizer:
    """The tokenizer a checkpoint recorded (`to_dict`)."""
    if state.get("type") == "bpe":
        return BPETokenizer(state["tokenizer_json"])
    return CharTokenizer.from_dict(state)


TOKENIZER_CHOICES = "char (the text's own characters), gpt2 (GPT-2's byte-level BPE) or the path of a tokenizer.json"


def tokenizer_from_spec(spec: str) -> BPETokenizer | None:
    """`--data.tokenizer`: None for `char` (the vocabulary is then the text's own characters), else the BPE
    tokenizer it names: `gpt2` (its tokenizer.json from the Hugging Face hub, cached) or a tokenizer.json."""
    if spec == "char":
        return None
    if spec == "gpt2":
        return BPETokenizer.from_file(hf_gpt2_folder("gpt2", files=["tokenizer.json"]) / "tokenizer.json")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer {spec!r} is neither {TOKENIZER_CHOICES}: check the path.")
    try:
        return BPETokenizer.from_file(path)
    except Exception as err:  # the tokenizers library's parse errors are plain Exceptions
        raise ValueError(f"data.tokenizer {path} is not a Hugging Face tokenizer.json ({err}).") from None


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
