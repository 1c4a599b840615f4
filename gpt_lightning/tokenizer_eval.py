"""Tokenizers on one scale: bytes and characters per token on a run's training and validation splits and on
other texts, and how much of the vocabulary the validation text uses; against characters (the default
tokenizer) and GPT-2's BPE when it is in the local Hugging Face cache. Plain Python: no Lightning here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpt_lightning.data.corpus import VAL_FRACTION
from gpt_lightning.data.token_cache import read_pieces, resolve_text_files
from gpt_lightning.tokenizer import BPETokenizer
from gpt_lightning.tokenizer_training import Compression, measure, select_text

CHARACTERS = "characters"  # the row of the default tokenizer: one token per character of the text's own


@dataclass(frozen=True)
class TokenizerReport:
    tokenizer: str  # what was measured: a tokenizer.json, gpt2, or CHARACTERS
    vocab_size: int
    compression: list[Compression]  # train, val, then each of the other texts
    unused_on_val: float  # the share of the vocabulary's ids that the validation split never produces


def evaluate_tokenizer(
    tokenizer: str,
    path: str | None = None,
    data_dir: str = "data",
    text_span: tuple[float, float] | None = None,
    speakers: list[str] | None = None,
    val_fraction: float = VAL_FRACTION,
    skip_undecodable: bool = False,
    files: list[str] | None = None,
    compare_gpt2: bool = True,
) -> list[TokenizerReport]:
    """Measures a tokenizer.json on the text `fit` would read with these data settings (see train_tokenizer:
    the same split, in characters), prints a table and returns its figures: the tokenizer's, then the
    character tokenizer's (its vocabulary is the selected text's own characters, as a run builds it), then
    GPT-2's when huggingface_hub's cache holds it.

    Args:
        tokenizer: The tokenizer.json to measure, or a folder that holds one.
        path: Your own UTF-8 text, as data.path. Unset: the tiny Shakespeare corpus in data_dir.
        data_dir: The folder that holds the corpus, as data.data_dir.
        text_span: Use only this part of the text, as data.text_span.
        speakers: Use only the speeches of these characters, as data.speakers.
        val_fraction: The share of the selected text, from its end, that is the validation split.
        skip_undecodable: Leave out the files that are not UTF-8, as data.skip_undecodable.
        files: Other texts to measure on, all of each: files, folders or globs, as data.path.
        compare_gpt2: Measure GPT-2's tokenizer too. It is only looked for in the local cache, never
            downloaded; the table says when it is not there.
    """
    bpe = _load(tokenizer)
    text = select_text(path, data_dir, text_span, speakers, val_fraction, skip_undecodable)
    others = {spec: resolve_text_files(spec, "files") for spec in files or []}
    measured = [(str(tokenizer), bpe)] + [(CHARACTERS, None)]
    gpt2 = _cached_gpt2() if compare_gpt2 else None
    if gpt2 is not None:
        measured.append(("gpt2", gpt2))
    reports = []
    for name, candidate in measured:
        train, used_on_train = measure(text.pieces("train"), "train", candidate)
        val, used_on_val = measure(text.pieces("val"), "val", candidate)
        rest = [measure(read_pieces(paths, what="files"), spec, candidate)[0] for spec, paths in others.items()]
        # Characters: the run's vocabulary is the characters of its whole text, both splits.
        vocab_size = len(set(used_on_train) | set(used_on_val)) if candidate is None else candidate.vocab_size
        unused = 1.0 - len(used_on_val) / vocab_size
        reports.append(TokenizerReport(name, vocab_size, [train, val, *rest], unused))
    print(format_reports(reports))
    if compare_gpt2 and gpt2 is None:
        print(
            "GPT-2's tokenizer is not in huggingface_hub's local cache, so it is not compared (nothing is "
            "downloaded here): `hf download openai-community/gpt2 tokenizer.json` puts it there."
        )
    return reports


def format_reports(reports: list[TokenizerReport]) -> str:
    """One row per tokenizer and text; the vocabulary's use on the validation split (the second text)."""
    rows = [("tokenizer", "vocab", "text", "characters", "tokens", "bytes/token", "chars/token", "unused ids")]
    for report in reports:
        for i, c in enumerate(report.compression):
            name, vocab = (report.tokenizer, f"{report.vocab_size:,}") if i == 0 else ("", "")
            unused = f"{report.unused_on_val:.1%}" if i == 1 else ""
            figures = (
                f"{c.characters:,}",
                f"{c.tokens:,}",
                f"{c.bytes_per_token:.3f}",
                f"{c.characters_per_token:.3f}",
            )
            rows.append((name, vocab, c.text, *figures, unused))
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    left = (0, 2)  # the names; figures align right
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _load(tokenizer: str) -> BPETokenizer:
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {tokenizer} is not a tokenizer.json (or a folder with one): check the path."
        )
    try:
        return BPETokenizer.from_file(path)
    except Exception as err:  # the tokenizers library's parse errors are plain Exceptions
        raise ValueError(f"tokenizer {path} is not a Hugging Face tokenizer.json ({err}).") from None


def _cached_gpt2() -> BPETokenizer | None:
    from gpt_lightning.hub import cached_hub_file

    found = cached_hub_file("gpt2", "tokenizer.json")
    return None if found is None else BPETokenizer.from_file(found)
