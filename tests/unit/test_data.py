import errno
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from gpt_lightning.data import corpus as data
from gpt_lightning.data.corpus import RandomWindows, SequentialWindows, ensure_corpus, read_text
from tests.conftest import unwritable

TOKENS = torch.arange(1000)


def test_windows_are_shifted_by_one():
    x, y = RandomWindows(TOKENS, block_size=16, batch_size=4, seed=0).batch(0)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # arange: each window is consecutive


def test_each_batch_depends_only_on_seed_rank_and_index():
    a = RandomWindows(TOKENS, 16, 8, seed=1, rank=0)
    assert torch.equal(a.batch(5)[0], RandomWindows(TOKENS, 16, 8, seed=1, rank=0).batch(5)[0])
    assert not torch.equal(a.batch(5)[0], a.batch(6)[0])
    assert not torch.equal(a.batch(5)[0], RandomWindows(TOKENS, 16, 8, seed=1, rank=1).batch(5)[0])
    assert not torch.equal(a.batch(5)[0], RandomWindows(TOKENS, 16, 8, seed=2, rank=0).batch(5)[0])


def test_a_stream_started_at_k_continues_the_full_stream():
    full = iter(RandomWindows(TOKENS, 16, 4, seed=0))
    batches = [next(full)[0] for _ in range(6)]
    resumed = iter(RandomWindows(TOKENS, 16, 4, seed=0, start=4))
    assert torch.equal(next(resumed)[0], batches[4]) and torch.equal(next(resumed)[0], batches[5])


def test_dataloader_workers_serve_the_same_stream_in_order():
    dataset = RandomWindows(TOKENS, 16, 4, seed=0)
    loader = iter(DataLoader(dataset, batch_size=None, num_workers=2))
    for i in range(5):
        assert torch.equal(next(loader)[0], dataset.batch(i)[0])


def test_validation_windows_cover_the_text_once_without_overlap():
    windows = SequentialWindows(torch.arange(101), block_size=10)
    assert len(windows) == 10
    xs = torch.cat([windows[i][0] for i in range(len(windows))])
    assert torch.equal(xs, torch.arange(100))
    assert torch.equal(windows[9][1], torch.arange(91, 101))


def test_text_shorter_than_a_window_is_an_error():
    with pytest.raises(ValueError, match="fewer than block_size"):
        SequentialWindows(torch.arange(10), block_size=10)
    with pytest.raises(ValueError, match="fewer than block_size"):
        RandomWindows(torch.arange(10), 10, 1, seed=0)


def test_read_text_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")


@pytest.fixture
def fake_corpus(tmp_path):
    """A stand-in corpus served from a file:// URL: (url, sha256, content)."""
    content = b"First Citizen:\nBefore we go.\n" * 50
    source = tmp_path / "source.txt"
    source.write_bytes(content)
    return source.as_uri(), hashlib.sha256(content).hexdigest(), content


def test_corpus_is_downloaded_verified_and_cached(tmp_path, fake_corpus):
    url, sha256, content = fake_corpus
    path = ensure_corpus(tmp_path / "data", url=url, sha256=sha256)
    assert path == tmp_path / "data" / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == content
    assert [p.name for p in path.parent.iterdir()] == ["input.txt"]  # no temporary file left behind
    Path(url.removeprefix("file://")).unlink()
    assert ensure_corpus(tmp_path / "data", url=url, sha256=sha256) == path  # cached: no second download


def test_a_corrupted_cached_corpus_is_reported_not_used(tmp_path, fake_corpus):
    url, sha256, content = fake_corpus
    path = ensure_corpus(tmp_path / "data", url=url, sha256=sha256)
    path.write_bytes(content[:-10])  # truncated
    with pytest.raises(ValueError, match="sha256 .* expected .*Delete it"):
        ensure_corpus(tmp_path / "data", url=url, sha256=sha256)


def test_the_real_checksum_guards_the_default_corpus(tmp_path):
    path = tmp_path / "tinyshakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_text("not Shakespeare")
    with pytest.raises(ValueError, match=data.CORPUS_SHA256):
        ensure_corpus(tmp_path)


def test_a_bad_download_is_not_saved(tmp_path, fake_corpus):
    url, _, _ = fake_corpus
    with pytest.raises(ValueError, match="not saved"):
        ensure_corpus(tmp_path / "data", url=url, sha256="0" * 64)
    assert not (tmp_path / "data" / "tinyshakespeare").exists() or not any(
        (tmp_path / "data" / "tinyshakespeare").iterdir()
    )


def test_a_failed_download_says_where_to_put_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="copy input.txt .* to .*tinyshakespeare/input.txt"):
        ensure_corpus(tmp_path / "data", url=(tmp_path / "nowhere.txt").as_uri())


def test_other_ranks_wait_for_the_download_instead_of_racing(tmp_path):
    with pytest.raises(TimeoutError, match="waited"):
        ensure_corpus(tmp_path / "data", download=False, wait_s=0.2)


# -- failing well: recording, cleaning up or reporting a failure never raises over the error it reports ------


@pytest.mark.parametrize("where", ["missing folders", "a file instead of a folder", "an unwritable folder"])
def test_recording_or_clearing_a_failure_never_raises_over_the_error_it_reports(tmp_path, monkeypatch, where):
    marker = tmp_path / "state" / ".builds" / "x.failed.json"
    if where == "a file instead of a folder":
        (tmp_path / "state").write_text("a file")
    elif where == "an unwritable folder":
        (tmp_path / "state").mkdir()
        unwritable(monkeypatch, tmp_path / "state")
    data.clear_failure(marker)  # an earlier launch's, if any
    data.record_failure(marker, ValueError("the real error"))
    if where == "missing folders":  # created: the node's other processes stop with the error at once
        with pytest.raises(ValueError, match="the real error"):
            data.raise_if_failed(marker)
        data.clear_failure(marker)
    data.raise_if_failed(marker)  # nothing (readable) recorded: the waiting process goes on waiting


@pytest.mark.parametrize("recorded", ["a list", "a string", "no message"])
def test_a_malformed_failure_marker_is_ignored(tmp_path, recorded):
    marker = tmp_path / "x.failed.json"
    this_launch = {"host": socket.gethostname(), "time": time.time()}
    marker.write_text(json.dumps({"a list": [1, 2], "a string": "text", "no message": this_launch}[recorded]))
    data.raise_if_failed(marker)


def test_a_failed_atomic_write_reports_its_own_error_when_cleaning_up_fails_too(tmp_path, monkeypatch):
    def broken_disk(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(data.os, "fsync", broken_disk)
    real_unlink = os.unlink

    def refused(path, *args, **kwargs) -> None:  # the temporary file cannot be removed either
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(OSError, match="Input/output error"):
        data.atomic_write_bytes(tmp_path / "meta.json", b"{}")
    assert not (tmp_path / "meta.json").exists()
