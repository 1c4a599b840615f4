"""The tiny Shakespeare corpus and the datasets cut from it. Plain PyTorch and the standard library."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
log = logging.getLogger(__name__)
VAL_FRACTION = 0.1  # the share of a text, from its end, held out for validation (nanoGPT's)


def corpus_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "tinyshakespeare" / "input.txt"


def sha256_of(path: Path) -> str:
    """The file's sha256, read a megabyte at a time: a checkpoint that is hashed may be gigabytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes a file that is either absent or complete, never half-written: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        discard(Path(tmp))
        raise


def discard(path: Path) -> None:
    """Removes a file that a failed or finished write leaves behind, if it can: cleaning up never raises over
    the error being reported (or fails what succeeded). One it cannot remove is logged, never hidden."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not remove %s (%s)", path, err)


class UnusableLocationError(ValueError):
    """A file or folder that the data needs and cannot use: a file where a folder must be (or the other way
    round), one this process may not write, a full disk. The message names it and how to go on."""


def check_folder(path: Path, what: str) -> None:
    """Raises an UnusableLocationError when `path` cannot be a folder: it, or the first of its parents that
    exists, is something else (a file, say). A folder that does not exist yet is fine: it is created."""
    for existing in (path, *path.parents):
        if existing.is_dir():
            return
        if os.path.lexists(existing):
            kind = "a file" if existing.is_file() else "not a folder"
            problem = f"is {kind}, not a folder" if existing == path else f"cannot be a folder: {existing} is {kind}"
            raise UnusableLocationError(f"{what} {path} {problem}. Point it at a folder (a missing one is created).")


@contextmanager
def os_errors_named(hint: str) -> Iterator[None]:
    """Turns the OSErrors of preparing the data (a folder that cannot be written, a folder where a file must
    be, a full disk) into UnusableLocationErrors: one line that names the path, followed by `hint` (which
    settings lead there). FileNotFoundError and TimeoutError already say what to do, and pass unchanged."""
    try:
        yield
    except (FileNotFoundError, TimeoutError):
        raise
    except OSError as err:
        message = err.strerror or str(err)
        if err.filename:
            message = f"{message}: {err.filename}"
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk's message says how to go on
            message = f"{message}. {hint}"
        raise UnusableLocationError(message) from err


def build_state_dir(folder: str | Path) -> Path:
    """Where the processes that share `folder` coordinate building what it holds: lock files, which stay
    (removing a lock that another process waits on would let a third one in), and recorded failures."""
    return Path(folder) / ".builds"


@contextmanager
def exclusive(lock_path: Path, what: str, wait_s: float = 3600.0) -> Iterator[None]:
    """Holds an exclusive lock while `what` is done, so that processes sharing a folder (the nodes of a
    cluster on one shared filesystem, say) do it once, one after the other. A POSIX record lock: NFS and
    local filesystems honour it, and it is released when its holder exits or dies, whatever the cause."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"waited {wait_s:.0f}s for another process {what} ({lock_path} is locked)."
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        try:
            os.close(fd)  # releases the lock, even when it reports an error (Linux frees the descriptor)
        except OSError as err:
            log.warning("closing the lock file %s failed (%s)", lock_path, err)


def is_local_rank_zero() -> bool:
    """Whether this process prepares data for its node: read from the launcher's environment (torchrun,
    SLURM), since it is asked before any process group exists."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) == 0


# When this process started (about): a failure recorded before it belongs to an earlier launch.
PROCESS_START = time.time()
FAILURE_GRACE_S = 30.0  # processes of one launch start within this of each other


def record_failure(marker: Path, err: BaseException) -> None:
    """Leaves `err` where the processes waiting for this one look (see `raise_if_failed`), if it can: the
    caller raises `err` next, and a marker that cannot be written (its folder is a file, or may not be
    written) must never raise over it. The waiting processes then stop when their wait times out."""
    failure = {"host": socket.gethostname(), "time": time.time(), "message": str(err)}
    try:
        atomic_write_bytes(marker, json.dumps(failure).encode())
    except OSError as write_error:
        log.warning("could not record this error in %s (%s): other processes of this launch on this machine, if "
                    "any, stop only when their wait times out", marker, write_error)  # fmt: skip


def clear_failure(marker: Path) -> None:
    """Removes an earlier launch's failure, if it can. One that stays is harmless: `raise_if_failed` ignores
    failures recorded before this launch."""
    try:
        marker.unlink(missing_ok=True)
    except OSError:
        pass  # a folder that cannot be used is reported by what uses it next


def raise_if_failed(marker: Path) -> None:
    """Raises the error that the process preparing the data on this machine recorded for this launch. A
    marker that cannot be read, or is not one, is no error: the caller goes on waiting."""
    try:
        failure = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(failure, dict) or not isinstance(message := failure.get("message"), str):
        return
    recorded = failure.get("time")
    this_launch = isinstance(recorded, int | float) and recorded >= PROCESS_START - FAILURE_GRACE_S
    if failure.get("host") == socket.gethostname() and this_launch:
        raise ValueError(message)


def verify_corpus(path: Path, sha256: str = CORPUS_SHA256) -> None:
    digest = sha256_of(path)
    if digest != sha256:
        raise ValueError(
            f"{path} is not the tiny Shakespeare corpus: its sha256 is {digest}, expected {sha256} "
            "(a truncated or edited copy?). Delete it to download it again, or replace it with a good copy."
        )


def download_corpus(path: Path, url: str = CORPUS_URL, sha256: str = CORPUS_SHA256, timeout: float = 60.0) -> None:
    """Downloads the corpus to `path`, verifying its checksum before it lands there."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as err:
        raise FileNotFoundError(
            f"could not download tiny Shakespeare from {url} ({err}). Without network, copy input.txt "
            f"(sha256 {sha256[:12]}...) to {path}, point --data.data_dir at a folder holding "
            "tinyshakespeare/input.txt, or give a local copy with --data.corpus_source PATH."
        ) from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"the download from {url} has sha256 {digest}, expected {sha256}; not saved.")
    atomic_write_bytes(path, data)


def ensure_corpus(
    data_dir: str | Path,
    download: bool = True,
    url: str = CORPUS_URL,
    sha256: str = CORPUS_SHA256,
    wait_s: float = 600.0,
    failure_marker: Path | None = None,
) -> Path:
    """Returns the verified corpus under data_dir. A missing file is downloaded when `download` is set;
    otherwise (a non-zero rank) it waits for the process that downloads it, since the write is atomic,
    and stops with that process's error if it records one in `failure_marker`."""
    path = corpus_path(data_dir)
    if not path.exists():
        if download:
            # Nodes that share data_dir download it once: the first to take the lock; the others find it there.
            with exclusive(build_state_dir(data_dir) / "tinyshakespeare.lock", "downloading the corpus"):
                if not path.exists():
                    download_corpus(path, url, sha256)
        else:
            deadline = time.monotonic() + wait_s
            while not path.exists():
                if failure_marker is not None:
                    raise_if_failed(failure_marker)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {wait_s:.0f}s for rank 0 to download the corpus to {path}.")
                time.sleep(0.5)
    verify_corpus(path, sha256)
    return path


def brief(value: object) -> str:
    """A value of a JSON line as an error message shows it: as JSON, cut to 60 characters."""
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def json_objects(text: str, name: str, error: type[Exception], each: str) -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line of a JSONL text, `where` naming `name` and the line; a line that
    is not a JSON object raises `error` saying so (one `each` a line)."""
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not a JSON object ({err.msg}, column {err.colno}).") from None
        if not isinstance(row, dict):
            raise error(f"{where}: not a JSON object but a JSON {type(row).__name__}: one {each} a line.")
        yield where, row


def read_text(path: str | Path, what: str = "text file") -> str:
    """Reads a UTF-8 text file, failing with a message that says what is wrong and how to fix it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (or is not a file): check the path.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {path} is not UTF-8 (byte {err.start}: {err.reason}): convert it, e.g. `iconv -f latin1 -t utf-8`."
        ) from err
    if not text:
        raise ValueError(f"{what} {path} is empty: give a file with text in it.")
    return text


SPEECH_BREAK = re.compile(r"\n\s*\n")  # what separates two speeches: a blank line, spaces or tabs on it allowed


def speaker_of(block: str) -> str:
    """The speaker of a speech: its first line, without the colon, upper-cased."""
    return block.lstrip("\n").split("\n", 1)[0].rstrip(":").upper()


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}: 0.1 holds out 10%.")


def validation_start(num_tokens: int, val_fraction: float) -> int:
    """Where the validation split begins: the last `val_fraction` of the tokens (nanoGPT's split) are held out.
    Counted in characters, it splits the text as a character model's run does."""
    check_val_fraction(val_fraction)
    return int(num_tokens * (1.0 - val_fraction))


def _batch_seed(seed: int, rank: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{rank}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RandomWindows(IterableDataset):
    """An endless stream of training batches: `batch_size` windows of block_size + 1 tokens at random
    offsets, as (x, y) with y shifted one token ahead. `tokens` may be a compact (uint8/16) tensor over a
    memory-mapped file: a batch reads only the pages its windows touch.

    Batch i on a rank depends only on (seed, rank, i): ranks draw different windows, and a run resumed
    at batch i draws exactly what an uninterrupted run would have. One gather builds a whole batch.
    """

    def __init__(
        self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int, rank: int = 0, start: int = 0
    ) -> None:
        if tokens.numel() < block_size + 1:
            raise ValueError(
                f"the training text has {tokens.numel()} tokens, fewer than block_size + 1 = {block_size + 1}: "
                "use a smaller block_size or more text."
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.start = start
        self._offsets = torch.arange(block_size + 1)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(_batch_seed(self.seed, self.rank, index))
        starts = torch.randint(self.tokens.numel() - self.block_size, (self.batch_size,), generator=generator)
        windows = self.tokens[starts[:, None] + self._offsets].long()  # (B, T + 1): one gather, then int64
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # DataLoader workers take turns, so worker w of W serves batches w, w + W, ... of the stream.
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while True:
            yield self.batch(index)
            index += workers


class SequentialWindows(Dataset):
    """Non-overlapping windows that cover the text once, in order: a deterministic evaluation set."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        if tokens.numel() < block_size + 1:
            raise ValueError(
                f"the validation text has {tokens.numel()} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}: use a smaller block_size, more text or a larger val_fraction."
            )
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        window = self.tokens[start : start + self.block_size + 1].long()
        return window[:-1], window[1:]
