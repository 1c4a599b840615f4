"""Text of any size as a token file on disk, encoded once and memory-mapped by every process.

A corpus is one text file, a folder of `.txt` files or a glob, read in sorted order with a blank line
(SEPARATOR) between files. `build_token_cache` streams it twice in chunks, never holding it whole: the
first pass checks the UTF-8, finds the vocabulary and hashes the bytes; the second writes one token per
character, as uint8 when the vocabulary has at most 256 symbols (uint16, uint32 beyond), or, with a BPE
tokenizer, its ids (uint16 for GPT-2's 50,257), encoded in pieces cut where the tokenizer ends a
pre-token and each cut is proved on the text around it (`BPETokenizer.encode_pieces`), so the ids are
exactly those of encoding the text in one go, in bounded memory whatever its shape. The token file
and a `meta.json` that describes it are written atomically into a cache folder named after the inputs,
so later runs reuse them, changed inputs rebuild them and a damaged cache is refused, never trained on.

Plain numpy and the standard library: no Lightning here.
"""

from __future__ import annotations

import codecs
import errno
import glob
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_lightning.data.corpus import (
    SPEECH_BREAK,
    atomic_write_bytes,
    build_state_dir,
    discard,
    exclusive,
    raise_if_failed,
    speaker_of,
)
from gpt_lightning.tokenizer import BPETokenizer

SEPARATOR = "\n\n"  # between the files of a folder or glob: a blank line, as between speeches
CHUNK_BYTES = 4 << 20  # bytes read at a time; a chunk's transient arrays take about 10x this
FORMAT_VERSION = 2
_MAX_CODE_POINT = 0x110000
log = logging.getLogger(__name__)


def resolve_text_files(spec: str | Path, what: str = "data.path") -> list[Path]:
    """The files `spec` names, in the order they are read: a file; a folder's `*.txt` files, recursively,
    sorted by path; or the files a glob matches (`**` recurses), sorted."""
    spec = str(spec)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"{what} {spec!r} matches no files: check the pattern.")
        return files
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file() and not _is_hidden(p.relative_to(path)))
        if not files:
            raise FileNotFoundError(
                f"{what} {path} is a folder with no .txt files in it. Put text files there, or name other "
                f"files with a glob, e.g. '{path}/**/*.py'."
            )
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (or is not a file): check the path.")
    return [path]


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _file_identity(files: list[Path]) -> list[dict[str, int | str]]:
    """What tells a cache its inputs changed: each file's absolute path, size and modification time."""
    identity: list[dict[str, int | str]] = []
    for f in files:
        stat = f.stat()
        identity.append({"path": str(f.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return identity


def read_pieces(files: list[Path], digest: hashlib._Hash | None = None, what: str = "text file") -> Iterator[str]:
    """The files' text in pieces of about CHUNK_BYTES, with SEPARATOR between files. Bytes that are not
    UTF-8 raise a ValueError naming the file and the byte offset. `digest` is fed every byte read."""
    for i, path in enumerate(files):
        if i:
            yield SEPARATOR
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0  # bytes of this file handed to the decoder so far
        with path.open("rb") as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                try:
                    piece = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    # The decoder prepends the bytes it held back from the previous chunk.
                    held = len(err.object) - len(chunk)
                    raise UndecodableTextError(path, f"byte {offset - held + err.start} ({err.reason})", what) from None
                if digest is not None:
                    digest.update(chunk)
                offset += len(chunk)
                if piece:
                    yield piece
                if not chunk:
                    break


class UndecodableTextError(ValueError):
    """A file whose bytes are not UTF-8."""

    def __init__(self, path: Path, where: str, what: str) -> None:
        super().__init__(
            f"{what} {path} is not UTF-8: {where}. Convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out "
            "(--data.skip_undecodable true leaves out every file that is not UTF-8)."
        )
        self.path, self.where = path, where


def undecodable_files(files: list[Path]) -> dict[Path, str]:
    """Every file that is not UTF-8, with where its first bad byte lies."""
    bad = {}
    for path in files:
        try:
            for _ in read_pieces([path]):
                pass
        except UndecodableTextError as err:
            bad[path] = err.where
    return bad


def _undecodable_error(bad: dict[Path, str], files: list[Path], what: str) -> ValueError:
    if len(bad) == 1:
        [(path, where)] = bad.items()
        return UndecodableTextError(path, where, what)
    shown = [f"{path} ({where})" for path, where in list(bad.items())[:3]]
    more = f", and {len(bad) - 3} more" if len(bad) > 3 else ""
    return ValueError(
        f"{len(bad)} of the {len(files)} files of {what} are not UTF-8: {', '.join(shown)}{more}. Convert them, "
        "e.g. `iconv -f latin1 -t utf-8`, or leave them out with --data.skip_undecodable true."
    )


def select_speeches(pieces: Iterable[str], speakers: list[str], where: str = "the text") -> Iterator[str]:
    """The speeches (a 'NAME:' line and what follows, up to a blank line) of the given speakers, joined by
    blank lines, streamed: what selecting them from the whole text at once would give. `where` names the text in
    the error raised when none is found."""
    wanted = {s.upper() for s in speakers}
    found = False

    def chosen(block: str) -> bool:
        return speaker_of(block) in wanted

    pending = ""
    for piece in pieces:
        pending += piece
        # A break is final once non-blank text follows it: a trailing run of whitespace may grow.
        last_text = len(pending.rstrip())
        start = 0
        for match in SPEECH_BREAK.finditer(pending, 0, last_text):
            block = pending[start : match.start()]
            if chosen(block):
                yield ("\n\n" if found else "") + block.strip("\n")
                found = True
            start = match.end()
        pending = pending[start:]
    if chosen(pending):
        yield ("\n\n" if found else "") + pending.strip("\n")
        found = True
    if not found:
        raise NoSpeechesError(
            f"no speeches by {', '.join(speakers)} in {where}: check the speaker names, or set --data.speakers "
            "null to train on all of the text."
        )
    yield "\n"


class NoSpeechesError(ValueError):
    """None of the selected speakers speaks in the selected text."""


def slice_pieces(pieces: Iterable[str], start: int, end: int) -> Iterator[str]:
    """Characters [start, end) of the text that `pieces` stream."""
    position = 0
    for piece in pieces:
        lo, hi = max(start - position, 0), min(end - position, len(piece))
        if lo < hi:
            yield piece[lo:hi]
        position += len(piece)
        if position >= end:
            return


@dataclass(frozen=True)
class Selection:
    """Which part of the text to serve: a span of it (fractions of its characters, taken first), then the
    speeches of some speakers within that span. The default is all of it."""

    span: tuple[float, float] | None = None
    speakers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.span is not None and not 0.0 <= self.span[0] < self.span[1] <= 1.0:
            raise ValueError(f"data.text_span must be [start, end] with 0 <= start < end <= 1, got {list(self.span)}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "span": list(self.span) if self.span else None,
            "speakers": list(self.speakers) if self.speakers else None,
        }


def code_points(piece: str) -> np.ndarray:
    """The piece's characters as code points: uint8 for ASCII (the common, fast case), else uint32."""
    if piece.isascii():
        return np.frombuffer(piece.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"a vocabulary of {vocab_size} symbols is too large")


@dataclass(frozen=True)
class TokenCache:
    """A verified token file and what it holds. `tokens()` maps it into memory."""

    directory: Path
    token_file: str  # its name inside `directory`; it carries a digest, so a rebuild never overwrites it
    vocab: str
    dtype: str
    num_tokens: int
    tokens_blake2b: str
    source_sha256: str  # of the bytes read from the input files, in order (a single file's own sha256)
    inputs: list[dict[str, int | str]]
    selection: dict[str, Any]  # Selection.to_dict()
    format_version: int = FORMAT_VERSION
    skipped: list[str] = field(default_factory=list)  # input files left out because they are not UTF-8
    tokenizer_sha256: str | None = None  # a BPE tokenizer's fingerprint; None: characters (`vocab`)
    num_chars: int | None = None  # characters of text the tokens stand for; None: num_tokens (characters)

    @property
    def characters(self) -> int:
        return self.num_tokens if self.num_chars is None else self.num_chars

    @property
    def path(self) -> Path:
        return self.directory / self.token_file

    def tokens(self) -> torch.Tensor:
        """The token ids as a 1-D tensor over the memory-mapped file: processes on a machine share its
        pages through the page cache, and only the pages a batch touches are read. Copy-on-write mapping,
        so the tensor is writable as torch expects; nothing is ever written back to the file."""
        if self.num_tokens == 0:
            return torch.empty(0, dtype=torch.uint8)
        with self.path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        # Training windows lie at random offsets: without this, each one would read ahead megabytes of
        # neighbours into the page cache and the process's resident memory.
        mapped.madvise(mmap.MADV_RANDOM)
        return torch.from_numpy(np.frombuffer(mapped, dtype=np.dtype(self.dtype), count=self.num_tokens))

    @classmethod
    def open(
        cls, directory: Path, vocab: str | None = None, full_check: bool = True, bpe: BPETokenizer | None = None
    ) -> TokenCache:
        """Reads and checks the cache in `directory`: its description, the token file's size and (with
        full_check) its checksum, and, when given, that it was encoded with `vocab` or `bpe`."""
        meta_path = directory / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            meta["directory"] = directory
            cache = cls(**meta)
        except (OSError, ValueError, TypeError) as err:
            raise CorruptCacheError(f"the token cache {meta_path} is unreadable ({err})") from err
        if cache.format_version != FORMAT_VERSION:
            raise CorruptCacheError(f"{meta_path} has format {cache.format_version}, not {FORMAT_VERSION}")
        if vocab is not None and cache.vocab != vocab:
            raise ValueError(
                f"the token cache {directory} was encoded with another vocabulary ({len(cache.vocab)} symbols) "
                f"than the one asked for ({len(vocab)} symbols): its ids would mean other characters. Delete "
                f"{directory} to re-encode the text, or point --data.cache_dir elsewhere."
            )
        if bpe is not None and cache.tokenizer_sha256 != bpe.fingerprint:
            raise ValueError(f"the token cache {directory} was encoded with another tokenizer: delete it to re-encode.")
        expected = cache.num_tokens * np.dtype(cache.dtype).itemsize
        size = cache.path.stat().st_size if cache.path.is_file() else -1
        if size != expected:
            raise CorruptCacheError(f"{cache.path} has {size} bytes, expected {expected}")
        if full_check and _blake2b_of(cache.path) != cache.tokens_blake2b:
            raise CorruptCacheError(f"{cache.path} does not match its checksum")
        return cache

    def is_fresh(self, files: list[Path], selection: Selection) -> bool:
        return self.inputs == _file_identity(files) and self.selection == selection.to_dict()


class CorruptCacheError(ValueError):
    """A token cache that cannot be trusted: it is rebuilt, never trained on."""


def cache_dir_for(
    root: Path,
    files_spec: str | Path,
    selection: Selection,
    vocab: str | None,
    skip_undecodable: bool = False,
    bpe: BPETokenizer | None = None,
) -> Path:
    """One folder per (inputs, selection, vocabulary, skipping): a fine-tune that encodes the corpus with its
    checkpoint's vocabulary never shares a cache with a run that uses the corpus's own, and a strict run never
    trains on a cache that left files out."""
    spec = str(files_spec) if glob.has_magic(str(files_spec)) else str(Path(files_spec).expanduser().resolve())
    fields = {"spec": spec, **selection.to_dict(), "vocab": vocab, "version": FORMAT_VERSION}
    if bpe is not None:
        fields["tokenizer"] = bpe.fingerprint
    key = json.dumps({**fields, "skip_undecodable": True} if skip_undecodable else fields)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).stem or "text")[:40]
    return Path(root) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _blake2b_of(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _pieces(
    files: list[Path], selection: Selection, digest: hashlib._Hash | None = None, what: str = "text file"
) -> Iterator[str]:
    where = f"{what} {files[0] if len(files) == 1 else f'({len(files)} files)'}"
    if selection.span is None:
        pieces = read_pieces(files, digest, what)
    else:
        # A span counts characters: one pass over every byte finds the total (and hashes the whole text;
        # the slicing pass stops at the span's end).
        total = sum(len(piece) for piece in read_pieces(files, digest, what))
        start, end = (int(total * fraction) for fraction in selection.span)
        pieces = slice_pieces(read_pieces(files, what=what), start, end)
        where += f" within data.text_span {list(selection.span)} (--data.text_span null: all of it)"
    return select_speeches(pieces, list(selection.speakers), where) if selection.speakers else pieces


def scan(files: list[Path], selection: Selection, what: str = "text file") -> tuple[np.ndarray, int, str]:
    """First pass: (which code points occur, as a boolean array; the character count; the sha256 of
    the bytes read). Checks the UTF-8 on the way."""
    seen = np.zeros(_MAX_CODE_POINT, dtype=bool)
    count = 0
    digest = hashlib.sha256()
    for piece in _pieces(files, selection, digest, what):
        points = code_points(piece)
        seen[: 256 if points.dtype == np.uint8 else _MAX_CODE_POINT] |= np.bincount(
            points, minlength=256 if points.dtype == np.uint8 else _MAX_CODE_POINT
        ).astype(bool)
        count += points.size
    return seen, count, digest.hexdigest()


def count_characters(files_spec: str | Path, selection: Selection, what: str = "data.path") -> int:
    """How many characters `selection` takes from the text: a streaming count, nothing written. A selection
    of speakers who do not speak there takes none (this measures; it does not check a run's settings)."""
    try:
        return sum(len(piece) for piece in _pieces(resolve_text_files(files_spec, what), selection, what=what))
    except NoSpeechesError:
        return 0


def _existing_cache(
    files: list[Path],
    files_spec: str | Path,
    root: Path,
    selection: Selection,
    vocab: str | None,
    skip_undecodable: bool,
    bpe: BPETokenizer | None = None,
) -> TokenCache | None:
    """A fresh cache of these inputs with these ids whose token file passes its checksum, if one is there
    (the checksum last: a stale cache is not worth hashing). A cache of the text's own characters serves a
    fixed vocabulary that equals them (a resumed or validated run asks for its checkpoint's, which is the
    text's own): its ids are the same, so the text is not encoded twice."""
    candidates = [(cache_dir_for(root, files_spec, selection, vocab, skip_undecodable, bpe), vocab)]
    if vocab is not None:
        candidates.append((cache_dir_for(root, files_spec, selection, None, skip_undecodable), None))
    for directory, required_vocab in candidates:
        try:  # a cache of other ids under the key of `vocab` is an error, not a cache to replace
            cache = TokenCache.open(directory, required_vocab, full_check=False, bpe=bpe)
        except (CorruptCacheError, FileNotFoundError):
            continue  # absent or damaged: (re)built atomically by the builder
        fresh = (vocab is None or cache.vocab == vocab) and cache.is_fresh(files, selection)
        if fresh and _blake2b_of(cache.path) == cache.tokens_blake2b:
            return cache
    return None


def build_token_cache(
    files_spec: str | Path,
    cache_root: str | Path,
    vocab: str | None = None,
    selection: Selection = Selection(),
    what: str = "data.path",
    skip_undecodable: bool = False,
    bpe: BPETokenizer | None = None,
) -> TokenCache:
    """Returns the token cache of the text `files_spec` names, building it if it is missing, stale or
    damaged. `vocab` fixes the vocabulary (a checkpoint's, when fine-tuning); unset, it is the text's own
    characters in sorted order, as CharTokenizer.from_text builds it. `bpe` encodes with a BPE tokenizer
    instead. Files that are not UTF-8 are an error that names them all, or, with `skip_undecodable`, are left
    out and listed in the cache."""
    files = resolve_text_files(files_spec, what)
    if bpe is not None and vocab is not None:
        raise ValueError("a token cache is encoded with a character vocabulary or a BPE tokenizer, not both.")
    directory = cache_dir_for(Path(cache_root), files_spec, selection, vocab, skip_undecodable, bpe)
    existing = partial(_existing_cache, files, files_spec, Path(cache_root), selection, vocab, skip_undecodable, bpe)
    cache = existing()
    if cache is not None:
        return cache
    # Nodes that share the cache folder build it once: whoever takes the lock first. The others find it
    # built when they get the lock, and never replace a file that another node may have mapped.
    with exclusive(build_state_dir(cache_root) / f"{directory.name}.lock", f"encoding {what} into {directory}"):
        cache = existing()
        if cache is not None:
            return cache
        log.info("encoding %s (%d file(s)) into %s", what, len(files), directory)
        return _encode(files, directory, vocab, selection, what, skip_undecodable, bpe)  # replaces a damaged one


def _encode(
    files: list[Path],
    directory: Path,
    vocab: str | None,
    selection: Selection,
    what: str,
    skip_undecodable: bool,
    bpe: BPETokenizer | None,
) -> TokenCache:
    identity = _file_identity(files)  # of every input, skipped ones too: a fixed file rebuilds the cache
    skipped: list[Path] = []
    try:
        seen, count, source_sha256 = scan(files, selection, what)
    except UndecodableTextError:
        bad = undecodable_files(files)  # all of them, in one error (this pass runs only when one is found)
        if not skip_undecodable:
            raise _undecodable_error(bad, files, what) from None
        skipped, files = list(bad), [f for f in files if f not in bad]
        if not files:
            raise _undecodable_error(bad, skipped, what) from None
        seen, count, source_sha256 = scan(files, selection, what)
    if count == 0:
        named = f"{files[0]} is empty" if len(files) == 1 else f"{len(files)} files hold no text"
        raise ValueError(f"{what} {named}: give text to train on.")
    present = "".join(map(chr, np.flatnonzero(seen)))
    if bpe is not None:
        vocab = ""
        dtype = token_dtype(bpe.vocab_size)
        encode_pieces = bpe.encode_pieces
    elif vocab is None:
        vocab = present
    else:
        unknown = sorted(set(present) - set(vocab))
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise ValueError(
                f"the fine-tuning text ({what}) has {len(unknown)} character(s) outside the model's "
                f"{len(vocab)}-character vocabulary: {shown}. Remove or replace them."
            )
    if bpe is None:
        dtype = token_dtype(len(vocab))
        lookup = np.zeros(_MAX_CODE_POINT, dtype=dtype)
        lookup[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=dtype)
        encode_pieces = partial(map, lambda piece: lookup[code_points(piece)])

    directory.mkdir(parents=True, exist_ok=True)
    needed = count * dtype.itemsize  # BPE: about a third of it (GPT-2: ~3.3 characters per token)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, _no_space(directory, needed, free))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokens.", suffix=".tmp")
    digest = hashlib.blake2b(digest_size=16)
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for piece_ids in encode_pieces(_pieces(files, selection, what=what)):
                ids = piece_ids.astype(dtype, copy=False).tobytes()
                digest.update(ids)
                f.write(ids)
                written += len(ids)
            f.flush()
            os.fsync(f.fileno())
        if bpe is None and written != needed:
            raise RuntimeError(f"the inputs changed while being encoded ({written} bytes, not {needed}): run again.")
        cache = TokenCache(
            directory=directory, token_file=f"tokens-{digest.hexdigest()}.bin", vocab=vocab, dtype=dtype.name,
            num_tokens=written // dtype.itemsize, tokens_blake2b=digest.hexdigest(), source_sha256=source_sha256,
            inputs=identity, selection=selection.to_dict(), skipped=[str(f) for f in skipped],
            tokenizer_sha256=None if bpe is None else bpe.fingerprint, num_chars=count,
        )  # fmt: skip
        if cache.path.is_file() and _blake2b_of(cache.path) == cache.tokens_blake2b:
            discard(Path(tmp))  # the same tokens are there, verified: leave the file others may map alone
        else:
            os.replace(tmp, cache.path)
        meta = {k: v for k, v in asdict(cache).items() if k != "directory"}
        atomic_write_bytes(directory / "meta.json", json.dumps(meta, ensure_ascii=False, indent=1).encode())
    except OSError as err:
        discard(Path(tmp))
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = shutil.disk_usage(directory).free
            except OSError:
                pass  # the figure from before the write: reporting never raises over the error reported
            raise OSError(err.errno, _no_space(directory, needed, free)) from err
        raise
    except BaseException:
        discard(Path(tmp))
        raise
    for old in directory.glob("tokens-*.bin"):
        if old.name != cache.token_file:
            discard(old)  # a rebuild's predecessor: a process that maps it keeps its pages
    return cache


def _no_space(directory: Path, needed: int, free: int) -> str:
    return (
        f"no space left to write the token cache in {directory}: it needs {needed / 1e6:,.1f} MB, "
        f"{free / 1e6:,.1f} MB are free. Nothing was written. Free some space, or put the cache on another "
        "disk with --data.cache_dir."
    )


def wait_for_token_cache(
    files_spec: str | Path,
    cache_root: str | Path,
    vocab: str | None = None,
    selection: Selection = Selection(),
    wait_s: float = 3600.0,
    failure_marker: Path | None = None,
    skip_undecodable: bool = False,
    bpe: BPETokenizer | None = None,
) -> TokenCache:
    """For the processes that do not build the cache: waits until the builder (local rank 0) has written
    a cache of the current inputs, and maps it only once its checksum holds. Stops with the builder's
    error as soon as it records one in `failure_marker`."""
    files = resolve_text_files(files_spec)
    directory = cache_dir_for(Path(cache_root), files_spec, selection, vocab, skip_undecodable, bpe)
    deadline = time.monotonic() + wait_s
    while True:
        cache = _existing_cache(files, files_spec, Path(cache_root), selection, vocab, skip_undecodable, bpe)
        if cache is not None:
            return cache
        if failure_marker is not None:
            raise_if_failed(failure_marker)
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {wait_s:.0f}s for local rank 0 to encode the text into {directory}.")
        time.sleep(0.5)
