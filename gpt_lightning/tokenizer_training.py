"""Train your own byte-level BPE (a Hugging Face `tokenizer.json`) on the text a run trains on, with the
`tokenizers` library's trainer (the `hf` extra). The text is chosen as `fit` chooses it (data.path or the
corpus, text_span, speakers), and only its training split is read unless asked otherwise, so that text held
out for validation stays unseen by the tokenizer too. Plain Python: no Lightning here."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gpt_lightning.data.corpus import (
    VAL_FRACTION,
    atomic_write_bytes,
    check_val_fraction,
    corpus_path,
    ensure_corpus,
    validation_start,
)
from gpt_lightning.data.token_cache import (
    Selection,
    UndecodableTextError,
    _pieces,
    resolve_text_files,
    slice_pieces,
    undecodable_files,
)
from gpt_lightning.tokenizer import BPETokenizer

BYTE_TOKENS = 256  # a byte-level BPE starts from every byte, so that it encodes any text
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)  # GPT-2's end of a document
PRE_TOKENIZERS = ("gpt2", "gpt4")
# GPT-4's (cl100k_base's) split, as tiktoken writes it: numbers in groups of up to 3 digits, contractions in any
# case, punctuation kept with the line breaks that follow it.
GPT4_SPLIT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
PIECE_CHARS = 1 << 16  # text handed to the trainer at a time: the trainer keeps word counts, never the text
SUMMARY_CHARS = 1 << 24  # the training text that the summary's compression is measured on, at most

# A lone line break between text: both pre-tokenizers (gpt2, gpt4) always end a word there, so training on
# pieces cut there learns the merges of the whole text.
_LINE_START = re.compile(r"(?<=\S)\n(?=\S)")


@dataclass(frozen=True)
class Compression:
    """How many tokens a tokenizer makes of a text."""

    text: str  # which text: train, val, or the files' spec
    characters: int
    bytes: int  # of the text in UTF-8
    tokens: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else float("nan")

    @property
    def characters_per_token(self) -> float:
        return self.characters / self.tokens if self.tokens else float("nan")


@dataclass(frozen=True)
class SelectedText:
    """The text a `fit` with the same data settings reads, and where its validation split begins."""

    files: list[Path]
    selection: Selection
    what: str  # names the text in errors
    characters: int
    split: int  # the first `split` characters are the training split

    def pieces(self, part: Literal["train", "val", "all"]) -> Iterator[str]:
        """The part's text, streamed in pieces."""
        start, end = {"train": (0, self.split), "val": (self.split, self.characters), "all": (0, self.characters)}[part]
        return slice_pieces(_pieces(self.files, self.selection, what=self.what), start, end)


def select_text(
    path: str | None = None,
    data_dir: str = "data",
    text_span: tuple[float, float] | None = None,
    speakers: list[str] | None = None,
    val_fraction: float = VAL_FRACTION,
    skip_undecodable: bool = False,
) -> SelectedText:
    """The text that `fit --data.*` with these settings reads (see TextDataModule for each setting).
    Its split is counted in characters: the training split is the first 1 - val_fraction of the selected
    characters, exactly the text a character model's run trains on. (A run with a BPE splits its tokens at
    the same fraction, so its split moves by a few characters with the tokens' lengths.)"""
    check_val_fraction(val_fraction)  # before any text is read
    what = "data.path" if path is not None else "the corpus"
    if path is not None:
        files = resolve_text_files(path)
    elif corpus_path(data_dir).is_file():
        files = [ensure_corpus(data_dir, download=False)]  # verifies its checksum
    else:
        raise FileNotFoundError(
            f"the corpus is not in {corpus_path(data_dir)}: `python main.py fit` downloads it there once, or copy "
            "tiny Shakespeare's input.txt there, or name your own text with path."
        )
    selection = Selection(
        span=None if text_span is None else (float(text_span[0]), float(text_span[1])),
        speakers=None if not speakers else tuple(speakers),
    )
    try:
        characters = sum(len(piece) for piece in _pieces(files, selection, what=what))
    except UndecodableTextError:
        if not skip_undecodable:
            raise
        files = [f for f in files if f not in undecodable_files(files)]  # as fit leaves them out
        if not files:
            raise ValueError(f"none of the files of {what} is UTF-8: there is no text to train on.") from None
        characters = sum(len(piece) for piece in _pieces(files, selection, what=what))
    split = validation_start(characters, val_fraction)
    if split == 0:
        raise ValueError(f"{what} has no text to train on ({characters} characters selected): give more text.")
    return SelectedText(files, selection, what, characters, split)


def line_pieces(pieces: Iterable[str], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The text of `pieces` again, cut after a lone line break between text every `piece_chars` or so: a
    byte-level pre-tokenizer (GPT-2's or GPT-4's) always ends a word there, so the trainer counts the same
    words as in the whole text at once. Text without such a break for 4 x piece_chars is cut anyway (it may
    split one word), so that memory stays bounded."""
    pending = ""
    for piece in pieces:
        pending += piece
        start = 0
        while (line := _LINE_START.search(pending, start + piece_chars)) is not None:
            yield pending[start : line.end()]
            start = line.end()
        pending = pending[start:]
        if len(pending) > 4 * piece_chars:
            yield pending
            pending = ""
    if pending:
        yield pending


def measure(pieces: Iterable[str], text: str, tokenizer: BPETokenizer | None = None) -> tuple[Compression, np.ndarray]:
    """How `tokenizer` (None: one token per character) compresses the text `pieces` stream, and the ids it
    produced there, sorted (for characters: their code points)."""
    counted = {"characters": 0, "bytes": 0, "tokens": 0}
    used: set[int] = set()

    def counting(stream: Iterable[str]) -> Iterator[str]:
        for piece in stream:
            counted["characters"] += len(piece)
            counted["bytes"] += len(piece.encode("utf-8"))
            yield piece

    if tokenizer is None:
        for piece in counting(pieces):
            used.update(map(ord, set(piece)))
        counted["tokens"] = counted["characters"]
    else:
        for ids in tokenizer.encode_pieces(counting(pieces)):
            counted["tokens"] += ids.size
            used.update(np.unique(ids).tolist())
    return Compression(text, **counted), np.array(sorted(used), dtype=np.int64)


@dataclass(frozen=True)
class TrainedTokenizer:
    path: Path
    vocab_size: int
    train_seconds: float  # reading the text and learning the merges
    compression: Compression  # on the text it was trained on


def train_tokenizer(
    output: str = "tokenizer.json",
    path: str | None = None,
    data_dir: str = "data",
    text_span: tuple[float, float] | None = None,
    speakers: list[str] | None = None,
    val_fraction: float = VAL_FRACTION,
    include_validation: bool = False,
    skip_undecodable: bool = False,
    vocab_size: int = 4096,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    pre_tokenizer: Literal["gpt2", "gpt4"] = "gpt2",
    overwrite: bool = False,
) -> TrainedTokenizer:
    """Trains a byte-level BPE on the training split of the text `fit` would read, and writes its
    tokenizer.json, for `fit --data.tokenizer OUTPUT`.

    The text streams through the trainer in pieces of about PIECE_CHARS, so memory does not grow with it.
    The same text and options give the same file, byte for byte: the trainer picks each merge by its count
    and breaks ties by the pair's ids, so its threads do not change the result (measured on tiny Shakespeare
    at 4,096 tokens, both pre-tokenizers: the same bytes with RAYON_NUM_THREADS 1 and 4).

    Args:
        output: The tokenizer.json to write, or a folder to write it into. Written atomically (complete or
            absent, never half-written).
        path: Your own UTF-8 text, as data.path: a file, a folder (its .txt files, recursively) or a glob.
            Unset: the tiny Shakespeare corpus in data_dir (it is not downloaded here: `fit` does that).
        data_dir: The folder that holds the corpus, as data.data_dir.
        text_span: Use only this part of the text, as [start, end] fractions of its characters, as
            data.text_span.
        speakers: Use only the speeches of these characters, as data.speakers.
        val_fraction: The share of the selected text, from its end, that is held out for validation, as
            data.val_fraction. The split counts characters: the tokenizer learns from exactly the text a
            character model's run trains on, and never sees the validation text.
        include_validation: Train on all of the selected text, the validation split too (then a run's
            validation text is no longer unseen by its tokenizer).
        skip_undecodable: Leave out the files that are not UTF-8, as data.skip_undecodable.
        vocab_size: Tokens in the vocabulary: the 256 bytes, the special tokens and the merges learned. At
            least 256 + the number of special tokens (that many learns no merges: bytes only). Text with fewer
            pairs to merge gives a smaller vocabulary.
        special_tokens: Tokens that the text never merges into and that stand for themselves wherever they
            occur in it, with ids 0, 1, ... in this order. The default is GPT-2's end of a document,
            <|endoftext|>; add role markers (e.g. <|user|>) for chat data, or give none.
        min_frequency: Learn no merge of a pair seen fewer times than this in the text.
        pre_tokenizer: How text is split into words before merging (merges never cross them): gpt2 (GPT-2's
            regex) or gpt4 (GPT-4's cl100k_base regex: digits in groups of up to three, contractions in any
            case). Neither adds a prefix space, which the token cache's encoding in pieces needs.
        overwrite: Replace an existing output file. Without it, an existing file is an error.
    """
    tokenizer, trainer = _new_training(vocab_size, special_tokens, min_frequency, pre_tokenizer)
    target = Path(output).expanduser()
    if target.is_dir():
        target = target / "tokenizer.json"
    _check_free(target, overwrite)  # before the work, and again before the write
    text = select_text(path, data_dir, text_span, speakers, val_fraction, skip_undecodable)
    part: Literal["train", "all"] = "all" if include_validation else "train"
    started = time.perf_counter()
    tokenizer.train_from_iterator(line_pieces(text.pieces(part), PIECE_CHARS), trainer)
    seconds = time.perf_counter() - started
    tokenizer_json = tokenizer.to_str(pretty=True)
    trained = BPETokenizer(tokenizer_json)
    # Encoding is the slow part (a few MB/s): a large text's compression is measured on its beginning.
    compression, _ = measure(slice_pieces(text.pieces(part), 0, SUMMARY_CHARS), part, trained)
    _check_free(target, overwrite)
    atomic_write_bytes(target, tokenizer_json.encode("utf-8"))
    short = "" if trained.vocab_size == vocab_size else f" (of {vocab_size} asked: the text has no more pairs to merge)"
    characters = text.characters if include_validation else text.split
    which = "all of it" if include_validation else f"its training split, the first {1 - val_fraction:.0%}"
    measured = "" if compression.characters == characters else f" (on its first {compression.characters:,})"
    print(
        f"trained a {trained.vocab_size}-token BPE{short} with the {pre_tokenizer} pre-tokenizer on "
        f"{characters:,} characters of {text.what} ({which}) in {seconds:.1f} s: "
        f"{compression.bytes_per_token:.2f} bytes/token, {compression.characters_per_token:.2f} characters/token"
        f"{measured}. Wrote {target}: train with --data.tokenizer {target}"
    )
    return TrainedTokenizer(target, trained.vocab_size, seconds, compression)


def _new_training(
    vocab_size: int, special_tokens: Sequence[str], min_frequency: int, pre_tokenizer: str
) -> tuple[Any, Any]:
    """An untrained byte-level BPE and its trainer, once the options are checked."""
    specials = list(special_tokens)
    if len(set(specials)) != len(specials) or not all(specials):
        raise ValueError(f"special_tokens must be distinct, non-empty strings, got {specials}.")
    if any("\n" in token or "\r" in token for token in specials):
        raise ValueError(
            f"special_tokens {specials} hold a line break: the token cache cuts text at line breaks, which would "
            "split such a token. Use tokens without one, such as <|user|>."
        )
    if vocab_size < BYTE_TOKENS + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE holds the {BYTE_TOKENS} bytes and the "
            f"{len(specials)} special token(s) before any merge. Give at least {BYTE_TOKENS + len(specials)}."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}.")
    if pre_tokenizer not in PRE_TOKENIZERS:
        raise ValueError(f"pre_tokenizer must be one of {', '.join(PRE_TOKENIZERS)}, got {pre_tokenizer!r}.")
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as err:
        raise ImportError("training a tokenizer needs the tokenizers library: pip install -e '.[hf]'") from err
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre_tokenizer == "gpt2")
    if pre_tokenizer == "gpt4":
        split = pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def _check_free(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists: give another output, or set overwrite to replace it.")
