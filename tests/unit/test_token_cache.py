"""The token cache: text of any size encoded once, streamed in chunks, memory-mapped by every process,
with the same ids and losses as the in-memory encoding it replaced."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_lightning.data import token_cache
from gpt_lightning.data.corpus import speaker_of
from gpt_lightning.data.token_cache import (
    SEPARATOR,
    Selection,
    TokenCache,
    build_token_cache,
    cache_dir_for,
    resolve_text_files,
    select_speeches,
    wait_for_token_cache,
)
from gpt_lightning.tokenizer import CharTokenizer
from gpt_lightning.training.datamodule import TextDataModule
from tests.conftest import ROOT, make_play

SHARED_DATA = ROOT.parent / "shared" / "data"
UNICODE = "Ça va? — «naïve» façade, 東京 and 🎭!\n"


def cached_ids(cache: TokenCache) -> list[int]:
    return cache.tokens().tolist()


def in_memory_ids(text: str) -> tuple[str, list[int]]:
    """What the data module did before the cache: the text's sorted characters, one id each."""
    tokenizer = CharTokenizer.from_text(text)
    return tokenizer.vocab, tokenizer.encode(text).tolist()


@pytest.mark.parametrize("chunk_bytes", [3, 5, 64, 4 << 20])
@pytest.mark.parametrize("text", [make_play(60), make_play(20) + UNICODE * 7], ids=["ascii", "unicode"])
def test_ids_and_vocabulary_match_the_in_memory_encoding(tmp_path, monkeypatch, text, chunk_bytes):
    # Tiny chunks split multi-byte characters and speech breaks across reads.
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", chunk_bytes)
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    cache = build_token_cache(path, tmp_path / "cache")
    vocab, ids = in_memory_ids(text)
    assert cache.vocab == vocab and cached_ids(cache) == ids
    assert cache.dtype == "uint8" and cache.path.stat().st_size == len(text)


def test_more_than_256_symbols_take_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3
    path = tmp_path / "han.txt"
    path.write_text(text, encoding="utf-8")
    cache = build_token_cache(path, tmp_path / "cache")
    assert cache.dtype == "uint16" and cached_ids(cache) == in_memory_ids(text)[1]


def speeches_of(text: str, speakers: list[str]) -> str:
    """The speeches (a 'NAME:' line and what follows, up to a blank line) of `speakers`, selected from the whole
    text at once: the oracle of select_speeches, which streams."""
    wanted = {s.upper() for s in speakers}
    chosen = [b.strip("\n") for b in re.split(r"\n\s*\n", text) if speaker_of(b) in wanted]
    return "\n\n".join(chosen) + "\n"


def test_the_speeches_of_speakers_are_selected_whatever_their_case():
    text = "ROMEO:\nHello.\n\nNURSE:\nAnon!\n\nROMEO:\nGood night.\nSleep.\n"
    assert "".join(select_speeches([text], ["romeo"])) == "ROMEO:\nHello.\n\nROMEO:\nGood night.\nSleep.\n"


@pytest.mark.parametrize("chunk_bytes", [7, 50, 4 << 20])
def test_streamed_speeches_match_the_whole_text_selection(monkeypatch, chunk_bytes):
    text = make_play(80, seed=3).replace("\n\n", "\n \n\n", 5).replace("\n\n", "\n\t\n", 3)
    pieces = [text[i : i + chunk_bytes] for i in range(0, len(text), chunk_bytes)]
    for speakers in (["king arthur"], ["KING ARTHUR", "LADY BEATRICE"]):
        assert "".join(select_speeches(pieces, speakers)) == speeches_of(text, speakers)
    with pytest.raises(ValueError, match="no speeches by HAMLET"):
        "".join(select_speeches(pieces, ["HAMLET"]))


def test_folders_and_globs_are_read_in_sorted_order_with_a_blank_line_between(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "c.txt").write_text("third")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("never\n")
    (tmp_path / "notes.md").write_text("not a .txt\n")
    expected = SEPARATOR.join(["first\n", "second\n", "third"])
    folder = build_token_cache(tmp_path, tmp_path / "cache1")
    assert CharTokenizer(folder.vocab).decode(folder.tokens()) == expected
    assert [p.name for p in resolve_text_files(f"{tmp_path}/**/*.md")] == ["notes.md"]
    pattern = build_token_cache(f"{tmp_path}/*.txt", tmp_path / "cache2")
    assert CharTokenizer(pattern.vocab).decode(pattern.tokens()) == SEPARATOR.join(["first\n", "third"])


def test_a_folder_without_text_files_or_an_empty_glob_names_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.csv").write_text("a,b\n")
    with pytest.raises(FileNotFoundError, match=r"no \.txt files in it.*glob"):
        build_token_cache(tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        build_token_cache(f"{tmp_path}/*.txt", tmp_path / "cache")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="blank.txt is empty"):
        build_token_cache(tmp_path / "blank.txt", tmp_path / "cache")


def test_bytes_that_are_not_utf8_are_reported_with_the_file_and_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", 16)
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("fine text\n")
    prefix = "é" * 20 + "abc"  # 43 bytes: the bad byte lies in the third chunk, after a split character
    bad.write_bytes(prefix.encode() + b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=rf"b\.txt is not UTF-8: byte {len(prefix.encode()) + 3} "):
        build_token_cache(tmp_path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.bin"))


def test_a_second_build_reuses_the_cache_and_changed_inputs_rebuild_it(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_text(make_play(30))
    first = build_token_cache(path, tmp_path / "cache")
    encodes = []
    real_encode = token_cache._encode
    monkeypatch.setattr(token_cache, "_encode", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    assert build_token_cache(path, tmp_path / "cache") == first and not encodes

    path.write_text(make_play(31))  # other text, other size and mtime
    second = build_token_cache(path, tmp_path / "cache")
    assert len(encodes) == 1 and cached_ids(second) == in_memory_ids(make_play(31))[1]
    assert [p.name for p in second.directory.glob("tokens-*.bin")] == [second.token_file]  # old file gone


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop meta.json fields"])
def test_a_damaged_cache_is_detected_and_rebuilt_never_trained_on(tmp_path, damage):
    path = tmp_path / "text.txt"
    path.write_text(make_play(30))
    cache = build_token_cache(path, tmp_path / "cache")
    if damage == "flip a byte":
        data = bytearray(cache.path.read_bytes())
        data[100] ^= 0xFF
        cache.path.write_bytes(bytes(data))
    elif damage == "truncate":
        cache.path.write_bytes(cache.path.read_bytes()[:-10])
    else:
        (cache.directory / "meta.json").write_text(json.dumps({"vocab": cache.vocab}))
    with pytest.raises(token_cache.CorruptCacheError):
        TokenCache.open(cache.directory)
    rebuilt = build_token_cache(path, tmp_path / "cache")
    assert cached_ids(rebuilt) == in_memory_ids(make_play(30))[1]


def test_a_cache_of_another_vocabulary_is_refused(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(make_play(30))
    cache = build_token_cache(path, tmp_path / "cache")
    other = "".join(sorted(set(cache.vocab + "#@")))
    with pytest.raises(ValueError, match=r"another vocabulary \(\d+ symbols\).*Delete"):
        TokenCache.open(cache.directory, vocab=other)
    # Asked for with that vocabulary (a checkpoint's), the text gets its own folder and the ids mean the
    # checkpoint's characters.
    fine_tune = build_token_cache(path, tmp_path / "cache", vocab=other)
    assert fine_tune.directory != cache.directory
    assert cached_ids(fine_tune) == CharTokenizer(other).encode(make_play(30)).tolist()


def test_a_vocabulary_that_lacks_characters_lists_them(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(make_play(10) + "café #1\n")
    vocab = CharTokenizer.from_text(make_play(10)).vocab
    with pytest.raises(ValueError, match=r"3 character\(s\) outside the model's .*'#', '1', 'é'"):
        build_token_cache(path, tmp_path / "cache", vocab=vocab)


def test_a_disk_that_fills_leaves_no_half_cache_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_text(make_play(30))
    old = build_token_cache(path, tmp_path / "cache")
    path.write_text(make_play(40))  # stale: the next build re-encodes

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_cache.os, "fsync", full)
    with pytest.raises(OSError, match="no space left to write the token cache.*Nothing was written.*cache_dir"):
        build_token_cache(path, tmp_path / "cache")
    assert sorted(p.name for p in old.directory.iterdir()) == sorted(["meta.json", old.token_file])
    assert TokenCache.open(old.directory) == old

    class Usage:
        free = 10

    monkeypatch.setattr(token_cache.shutil, "disk_usage", lambda _: Usage)
    with pytest.raises(OSError, match=r"it needs 0\.0 MB, 0\.0 MB are free"):
        build_token_cache(path, tmp_path / "cache")


def test_a_full_disk_is_reported_even_when_the_temporary_file_cannot_be_removed(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_text(make_play(30))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    real_unlink = os.unlink

    def refused(file, *args, **kwargs) -> None:
        if str(file).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        real_unlink(file, *args, **kwargs)

    monkeypatch.setattr(token_cache.os, "fsync", full)
    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(OSError, match="no space left to write the token cache"):
        build_token_cache(path, tmp_path / "cache")


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_every_process_stops_at_once_when_data_dir_is_a_file(tmp_path, monkeypatch, local_rank):
    (tmp_path / "notafile").write_text("a file, not a folder")
    monkeypatch.setenv("LOCAL_RANK", local_rank)  # 1: a process that would wait for local rank 0's corpus

    def no_waiting(seconds: float) -> None:
        raise AssertionError("waited for a corpus that local rank 0 cannot download")

    monkeypatch.setattr(time, "sleep", no_waiting)
    with pytest.raises(ValueError, match=r"data.data_dir .*notafile is a file, not a folder"):
        TextDataModule(data_dir=str(tmp_path / "notafile")).token_cache  # noqa: B018


def test_other_processes_wait_for_the_builder_and_map_the_same_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(make_play(30))
    with pytest.raises(TimeoutError, match="local rank 0"):
        wait_for_token_cache(path, tmp_path / "cache", wait_s=0.2)
    built = build_token_cache(path, tmp_path / "cache")
    waited = wait_for_token_cache(path, tmp_path / "cache", wait_s=0.2)
    assert waited == built and torch.equal(waited.tokens(), built.tokens())
    assert cache_dir_for(tmp_path / "cache", path, Selection(), None) == built.directory


def test_the_data_module_serves_int64_batches_from_the_compact_map(tmp_path, text_file):
    data = TextDataModule(path=str(text_file), cache_dir=str(tmp_path), block_size=16, batch_size=4)
    data.prepare_data()
    data.setup("fit")
    assert data.train_tokens is not None and data.train_tokens.dtype == torch.uint8
    x, y = next(iter(data.train_dataloader()))
    assert x.dtype == y.dtype == torch.int64 and x.shape == (4, 16)
    vx, _ = next(iter(data.val_dataloader()))
    assert vx.dtype == torch.int64
    text = text_file.read_text()
    assert data.tokenizer.decode(data.train_tokens) + data.tokenizer.decode(data.val_tokens) == text


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare/input.txt").exists(), reason="needs ../shared corpus")
def test_the_corpus_keeps_its_ids_split_and_speeches(tmp_path):
    data = TextDataModule(data_dir=str(SHARED_DATA), cache_dir=str(tmp_path), block_size=64)
    data.setup("fit")
    text = (SHARED_DATA / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    assert data.vocab == "".join(sorted(set(text))) and len(data.vocab) == 65
    assert data.train_tokens is not None and data.val_tokens is not None
    assert data.train_tokens.numel() == 1003854 and data.val_tokens.numel() == 111540
    assert data.token_cache.source_sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    ids = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[[ord(c) for c in data.vocab]] = np.arange(65)
    assert torch.equal(torch.cat([data.train_tokens, data.val_tokens]), torch.from_numpy(lookup[ids]))
    speeches = TextDataModule(data_dir=str(SHARED_DATA), cache_dir=str(tmp_path), speakers=["ROMEO", "JULIET"])
    assert speeches.tokenizer.decode(speeches.token_cache.tokens()) == speeches_of(text, ["ROMEO", "JULIET"])


# The first losses of the CPU recipe of the day the cache arrived (nanoGPT's: 4 layers, 4 heads, 128 wide,
# context 64, batch 12, AdamW 1e-3 to 1e-4, 100 warm-up steps, seed 1337), as main computed them from
# the in-memory int64 encoding. The data path changed; the data must not.
PINNED_LOSSES = {0: 4.193244934082031, 1: 4.152455806732178, 2: 4.126370906829834, 3: 4.087012767791748,
                 4: 4.038215160369873, 99: 2.6806514263153076}  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare/input.txt").exists(), reason="needs ../shared corpus")
def test_nanogpts_cpu_recipe_trains_on_exactly_the_same_batches_as_before(tmp_path):
    from gpt_lightning.training.cli import GPTLightningCLI
    from tests.probe import RecordRank

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = GPTLightningCLI(
            args=["--config", str(ROOT / "configs/pretrain_cpu_nanogpt.yaml"), f"--data.data_dir={SHARED_DATA}",
                  f"--data.cache_dir={tmp_path / 'cache'}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                  "--model.n_layer=4", "--model.n_head=4", "--model.n_embd=128", "--model.dropout=0.0",
                  "--model.learning_rate=1e-3", "--model.min_lr=1e-4", "--model.warmup_steps=100",
                  "--data.block_size=64", "--data.batch_size=12", "--seed_everything=1337",
                  "--trainer.max_steps=100", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=1",
                  "--progress_bar.refresh_rate=0", "--sample.every_n_validations=0",
                  "--last_checkpoint.every_n_train_steps=0", "--checkpoint.save_top_k=0",
                  "--trainer.enable_model_summary=false"],
            run=False,
        )  # fmt: skip
        record = RecordRank(str(tmp_path / "probe"))
        cli.trainer.callbacks.append(record)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        torch.set_num_threads(threads)
    assert len(record.losses) == 100
    for step, loss in PINNED_LOSSES.items():
        assert record.losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step


@pytest.mark.parametrize("span", [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0)])
def test_a_span_records_the_sha256_of_the_whole_file(tmp_path, monkeypatch, span):
    # Several chunks: a span that ends early must still hash the bytes after it, or a checkpoint records
    # a wrong hash and the overlap check silently skips a fine-tune on part of the pre-training text.
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", 1000)
    path = tmp_path / "play.txt"
    path.write_text(make_play(200), encoding="utf-8")
    cache = build_token_cache(path, tmp_path / "cache", selection=Selection(span=span))
    assert cache.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def messy_corpus(tmp_path):
    """Six files, four of them Latin-1 or KOI8-R, as in a real code corpus."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("a.txt", "c.txt"):
        (folder / name).write_text(make_play(20), encoding="utf-8")
    for name, encoding in (("b.txt", "latin-1"), ("d.txt", "latin-1"), ("e.txt", "koi8-r"), ("f.txt", "koi8-r")):
        (folder / name).write_bytes("Größe, привет\n".encode(encoding, errors="replace") * 3)
    return folder


def test_every_undecodable_file_is_reported_in_one_error(tmp_path):
    with pytest.raises(ValueError) as error:
        build_token_cache(messy_corpus(tmp_path), tmp_path / "cache")
    message = str(error.value)
    assert message.startswith("4 of the 6 files of data.path are not UTF-8:")
    assert "b.txt (byte 2" in message and "d.txt" in message and "e.txt" in message and "and 1 more" in message
    assert "--data.skip_undecodable true" in message


def test_skip_undecodable_leaves_them_out_and_says_which(tmp_path, text_file):
    folder = messy_corpus(tmp_path)
    cache = build_token_cache(folder, tmp_path / "cache", skip_undecodable=True)
    assert [Path(p).name for p in cache.skipped] == ["b.txt", "d.txt", "e.txt", "f.txt"]
    good = (folder / "a.txt").read_text() + SEPARATOR + (folder / "c.txt").read_text()
    assert cached_ids(cache) == in_memory_ids(good)[1]
    data = TextDataModule(path=str(folder), cache_dir=str(tmp_path / "cache"), skip_undecodable=True,
                                 block_size=8, batch_size=2)  # fmt: skip
    with pytest.warns(UserWarning, match=r"left out 4 files that are not UTF-8: .*b.txt"):
        assert data.describe()["skipped"] == cache.skipped
    with pytest.raises(ValueError, match="4 of the 6 files"):  # strict is the default, and shares no cache
        build_token_cache(folder, tmp_path / "cache")


def test_a_waiting_process_never_maps_a_token_file_that_fails_its_checksum(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(make_play(50), encoding="utf-8")
    cache = build_token_cache(path, tmp_path / "cache")
    data = bytearray(cache.path.read_bytes())
    data[10] ^= 1  # same size, other bytes: only the checksum tells
    cache.path.write_bytes(bytes(data))
    with pytest.raises(TimeoutError):
        wait_for_token_cache(path, tmp_path / "cache", wait_s=1.0)
    rebuilt = build_token_cache(path, tmp_path / "cache")  # what local rank 0 does: rebuild it
    assert wait_for_token_cache(path, tmp_path / "cache", wait_s=1.0).tokens_blake2b == rebuilt.tokens_blake2b
