"""Training your own BPE (tokenizer_training) and measuring it (tokenizer_eval), on generated text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_lightning import tokenizer_training
from gpt_lightning.data.corpus import validation_start
from gpt_lightning.data.token_cache import build_token_cache
from gpt_lightning.tokenizer import BPETokenizer
from gpt_lightning.tokenizer_eval import CHARACTERS, evaluate_tokenizer
from gpt_lightning.tokenizer_training import select_text, train_tokenizer
from tests.conftest import ROOT, make_play

HELD_OUT_WORD = "qzxjqzxj"  # letters that make_play never writes in lower case


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_the_validation_split_never_reaches_the_vocabulary(tmp_path: Path):
    play = make_play(300)
    held_out = "\n\nWATCHER:\n" + "\n".join([" ".join([HELD_OUT_WORD] * 8)] * 20) + "\n"
    text = write(tmp_path / "play.txt", play + held_out)
    assert len(held_out) < 0.1 * len(play + held_out)  # the word lies in the last 10% only

    train_tokenizer(str(tmp_path / "train.json"), path=text, vocab_size=600, val_fraction=0.1, special_tokens=[])
    vocab = BPETokenizer.from_file(tmp_path / "train.json")._tokenizer.get_vocab()
    assert not [token for token in vocab if len(token) > 1 and set(token) & set(HELD_OUT_WORD)]

    # Trained on all of the text, the word is learned: the check above can fail.
    train_tokenizer(str(tmp_path / "all.json"), path=text, vocab_size=600, include_validation=True)
    assert len(BPETokenizer.from_file(tmp_path / "all.json").encode(HELD_OUT_WORD)) == 1


def test_the_training_split_is_the_text_a_character_run_trains_on(text_file: Path, tmp_path: Path):
    from gpt_lightning.training.datamodule import TextDataModule

    settings = {"text_span": (0.2, 1.0), "speakers": ["KING ARTHUR", "LADY BEATRICE"], "val_fraction": 0.15}
    data = TextDataModule(path=str(text_file), cache_dir=str(tmp_path), block_size=8, batch_size=2, **settings)
    data.setup("fit")
    assert data.train_tokens is not None and data.val_tokens is not None
    text = select_text(str(text_file), **settings)  # type: ignore[arg-type]
    assert "".join(text.pieces("train")) == data.tokenizer.decode(data.train_tokens)
    assert "".join(text.pieces("val")) == data.tokenizer.decode(data.val_tokens)


def test_the_same_text_and_options_give_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    text = write(tmp_path / "play.txt", make_play(1500, seed=1))
    first = train_tokenizer(str(tmp_path / "a.json"), path=text, vocab_size=420, pre_tokenizer="gpt4")
    again = train_tokenizer(str(tmp_path / "b.json"), path=text, vocab_size=420, pre_tokenizer="gpt4")
    assert first.vocab_size == 420
    assert first.path.read_bytes() == again.path.read_bytes()

    # In pieces of a few hundred characters, the trainer counts the same words as in one piece.
    monkeypatch.setattr(tokenizer_training, "PIECE_CHARS", 300)
    pieces = train_tokenizer(str(tmp_path / "c.json"), path=text, vocab_size=420, pre_tokenizer="gpt4")
    assert pieces.path.read_bytes() == first.path.read_bytes()

    # A fresh process with another number of the trainer's threads.
    fresh = tmp_path / "d.json"
    code = f"from gpt_lightning.tokenizer_training import train_tokenizer as t; t({str(fresh)!r}, path={text!r}, "
    code += "vocab_size=420, pre_tokenizer='gpt4')"
    env = {**os.environ, "RAYON_NUM_THREADS": "3", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    assert fresh.read_bytes() == first.path.read_bytes()


def test_the_output_is_written_whole_and_never_replaced_unasked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    text = write(tmp_path / "play.txt", make_play(200))
    output = tmp_path / "out" / "tokenizer.json"
    output.parent.mkdir()
    output.write_text("mine")
    with monkeypatch.context() as patched:
        patched.setattr(tokenizer_training, "select_text", lambda *args: pytest.fail("read the text first"))
        with pytest.raises(FileExistsError, match="exists: give another output, or set overwrite to replace it"):
            train_tokenizer(str(output.parent), path=text, vocab_size=300)  # a folder: its tokenizer.json

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)  # the write fails after the bytes, before the rename
    with pytest.raises(OSError, match="No space left"):
        train_tokenizer(str(output), path=text, vocab_size=300, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        train_tokenizer(str(tmp_path / "out" / "new.json"), path=text, vocab_size=300)
    assert output.read_text() == "mine"
    assert sorted(p.name for p in output.parent.iterdir()) == ["tokenizer.json"]  # no partial file left

    monkeypatch.undo()
    train_tokenizer(str(output), path=text, vocab_size=300, overwrite=True)
    assert BPETokenizer.from_file(output).vocab_size == 300


def test_special_tokens_come_first_with_their_ids(tmp_path: Path):
    text = write(tmp_path / "play.txt", make_play(200))
    default = train_tokenizer(str(tmp_path / "default.json"), path=text, vocab_size=300)
    assert BPETokenizer.from_file(default.path)._tokenizer.token_to_id("<|endoftext|>") == 0

    roles = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
    trained = train_tokenizer(str(tmp_path / "roles.json"), path=text, vocab_size=300, special_tokens=roles)
    bpe = BPETokenizer.from_file(trained.path)
    assert [bpe._tokenizer.token_to_id(token) for token in roles] == [0, 1, 2]
    chat = "<|user|>Good my lord?<|assistant|>No more.<|endoftext|>"
    ids = bpe.encode(chat).tolist()
    assert ids[0] == 1 and 2 in ids and ids[-1] == 0
    assert bpe.decode(ids) == chat
    assert bpe.characters_per_token()[1] == len("<|user|>")


@pytest.mark.parametrize(
    "options, error",
    [({"vocab_size": 256}, "vocab_size 256 is too small: .* Give at least 257"),
     ({"special_tokens": ["<|a|>", "<|a|>"]}, "special_tokens must be distinct"),
     ({"special_tokens": ["<|turn|>\n"]}, "hold a line break"),
     ({"min_frequency": 0}, "min_frequency must be >= 1"),
     ({"pre_tokenizer": "gpt3"}, "pre_tokenizer must be one of gpt2, gpt4"),
     ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
     ({"path": None, "data_dir": "nowhere"}, "the corpus is not in nowhere/tinyshakespeare/input.txt")],
    ids=["vocab", "duplicate", "line break", "frequency", "pre-tokenizer", "fraction", "no corpus"],
)  # fmt: skip
def test_bad_options_are_clear_errors(tmp_path: Path, options: dict, error: str):
    text = write(tmp_path / "play.txt", make_play(20))
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        train_tokenizer(str(tmp_path / "t.json"), **{"path": text, **options})
    assert not (tmp_path / "t.json").exists()


def test_bytes_only_is_a_tokenizer_too(tmp_path: Path):
    text = write(tmp_path / "play.txt", "Ça va, 東京?\n" + make_play(20))
    trained = train_tokenizer(str(tmp_path / "t.json"), path=text, vocab_size=256, special_tokens=[])
    assert trained.vocab_size == 256
    assert trained.compression.bytes == trained.compression.tokens  # one token per byte


@pytest.mark.parametrize("pre_tokenizer", ["gpt2", "gpt4"])
def test_a_trained_tokenizer_round_trips_and_fills_the_token_cache(tmp_path: Path, pre_tokenizer: str):
    # Long enough for the token cache to encode it in several segments, checking each seam.
    text = make_play(3500) + "\nNURSE:\nÇa va, naïve 東京, 12345 — 'TIS done.\r\n"
    path = write(tmp_path / "play.txt", text)
    trained = train_tokenizer(str(tmp_path / "t.json"), path=path, vocab_size=400, pre_tokenizer=pre_tokenizer)
    bpe = BPETokenizer.from_file(trained.path)
    kind = json.loads(trained.path.read_text())["pre_tokenizer"]["type"]
    assert kind == {"gpt2": "ByteLevel", "gpt4": "Sequence"}[pre_tokenizer]  # Sequence: GPT-4's split, then bytes
    assert bpe.decode(bpe.encode(text)) == text
    cache = build_token_cache(path, tmp_path / "cache", bpe=bpe)
    assert cache.tokens().tolist() == bpe.encode(text).tolist()


def test_evaluation_figures_are_the_hand_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    from huggingface_hub import constants

    text = make_play(60, seed=2) + "NURSE:\nÇa va, 東京!\n"
    other = "Ça va? Good my lord, 東京.\n"
    path, other_path = write(tmp_path / "play.txt", text), write(tmp_path / "other.txt", other)
    trained = train_tokenizer(str(tmp_path / "t.json"), path=path, vocab_size=320, val_fraction=0.2)
    bpe = BPETokenizer.from_file(trained.path)
    split = validation_start(len(text), 0.2)
    train, val = text[:split], text[split:]
    assert trained.compression.tokens == len(bpe.encode(train))

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    capsys.readouterr()
    ours, characters = evaluate_tokenizer(str(trained.path), path=path, val_fraction=0.2, files=[other_path])
    assert "GPT-2's tokenizer is not in huggingface_hub's local cache" in capsys.readouterr().out
    assert [(c.text, c.characters, c.bytes, c.tokens) for c in ours.compression] == [
        (name, len(part), len(part.encode()), len(bpe.encode(part)))
        for name, part in (("train", train), ("val", val), (other_path, other))
    ]
    assert ours.compression[1].bytes_per_token == len(val.encode()) / len(bpe.encode(val))
    assert ours.unused_on_val == 1 - len(set(bpe.encode(val).tolist())) / bpe.vocab_size
    assert characters.tokenizer == CHARACTERS and characters.vocab_size == len(set(text))
    assert [c.tokens for c in characters.compression] == [len(train), len(val), len(other)]
    assert characters.unused_on_val == 1 - len(set(val)) / len(set(text))

    # GPT-2's tokenizer in the local cache (here: ours, stored as the hub stores it) is measured too.
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_bytes(trained.path.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    *_, gpt2 = evaluate_tokenizer(str(trained.path), path=path, val_fraction=0.2)
    table = capsys.readouterr().out
    assert gpt2.tokenizer == "gpt2" and gpt2.compression == ours.compression[:2]
    assert "not in huggingface_hub's local cache" not in table and "\ngpt2 " in table


def test_a_bpe_trained_with_the_chat_templates_markers_reads_each_as_one_token(tmp_path: Path):
    from gpt_lightning.data.instruct import TEMPLATES, render_prompt

    chat = TEMPLATES["chat"]
    markers = sorted({chat.system.strip(), chat.user.strip(), chat.assistant.strip(), chat.end})
    text = write(tmp_path / "play.txt", make_play(100))
    trained = train_tokenizer(str(tmp_path / "tok.json"), path=text, vocab_size=300, min_frequency=1,
                              special_tokens=("<|endoftext|>", *markers))  # fmt: skip
    bpe = BPETokenizer.from_file(trained.path)
    prompt = render_prompt(chat, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "KING"}])
    pieces = [bpe.decode([i]) for i in bpe.encode(prompt).tolist()]
    assert all(marker in pieces for marker in markers if marker in prompt)  # each marker one token, not its bytes
    assert "".join(pieces) == prompt
