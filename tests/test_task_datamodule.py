"""The task data module: its vocabulary (or the refusal of a checkpoint's), splits, block size and batches; and a
task fine-tune end to end: fit configs/finetune_task.yaml, generate in the template, evaluate, LoRA, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt_lightning.instruct import IGNORE_INDEX, TEMPLATES, ExampleBatches, TaskDataError
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sources import metadata
from gpt_lightning.task_datamodule import TaskDataModule
from gpt_lightning.tokenizer import CharTokenizer
from tests.conftest import make_play

SHAKESPEARE = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's 65


def char_checkpoint(path: Path, vocab: str, block_size: int = 32) -> Path:
    """A checkpoint of ours with random weights and a character vocabulary: enough to start a fine-tune from."""
    config = GPTConfig(vocab_size=len(vocab), block_size=block_size, n_layer=1, n_head=1, n_embd=8)
    state = {f"gpt.{k}": v for k, v in GPT(config).state_dict().items()}
    torch.save({"state_dict": state, "gpt_lightning": metadata(config, CharTokenizer(vocab))}, path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_pre_trained_character_vocabulary_without_digits_refuses_addition_with_the_missing_list(tmp_path: Path):
    ckpt = char_checkpoint(tmp_path / "shakespeare.ckpt", SHAKESPEARE)
    data = TaskDataModule(task="addition-2", task_examples=100, init_from=str(ckpt))
    with pytest.raises(ValueError) as error:
        data.vocab  # noqa: B018 (the CLI asks for it first)
    message = str(error.value)
    assert message.startswith("10 character(s) of the task data or the template plain are not in the 65-character")
    for char in "012456789+":
        assert repr(char) in message
    assert "'3'" not in message  # tiny Shakespeare has a 3
    assert "(addition-2 train item 0)" in message and "drop model.init_from" in message
    # the same vocabulary reads a task in its characters, and the chat template's markers are refused too
    words = tmp_path / "words.txt"
    words.write_text(make_play(50))
    assert TaskDataModule(task=f"reverse-words:{words}", init_from=str(ckpt)).tokenizer.vocab == SHAKESPEARE
    with pytest.raises(ValueError, match=r"the template chat .* '<' \(template chat\)"):
        TaskDataModule(task=f"reverse-words:{words}", template="chat", init_from=str(ckpt)).tokenizer  # noqa: B018


def test_from_scratch_the_vocabulary_is_the_datas_and_the_templates_and_the_block_size_the_longest(tmp_path: Path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "completion": "x" * i} for i in range(1, 21)])
    data = TaskDataModule(train_file=str(train), template="chat", val_fraction=0.25, seed=3)
    assert set(data.vocab) == set("p0123456789x") | set(TEMPLATES["chat"].markers)
    assert len(data.splits["val"]) == 5 and len(data.splits["train"]) == 15
    again = TaskDataModule(train_file=str(train), template="chat", val_fraction=0.25, seed=3)
    assert [e.where for e in again.splits["val"]] == [e.where for e in data.splits["val"]]  # a fixed seed
    longest = max(x.numel() for pairs in data.encoded.values() for x, _ in pairs)
    assert data.block_size == longest
    with pytest.raises(TaskDataError, match=r"20 example\(s\) are longer than the block size of 8 tokens"):
        TaskDataModule(train_file=str(train), block_size=8).encoded  # noqa: B018
    val = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "p1", "completion": "x"}])
    assert len(TaskDataModule(train_file=str(train), val_file=str(val)).splits["val"]) == 1
    with pytest.raises(ValueError, match="one of them"):
        TaskDataModule()
    with pytest.raises(ValueError, match="one of them"):
        TaskDataModule(train_file=str(train), task="addition-2")


def test_training_batches_depend_only_on_seed_rank_and_index_and_cover_every_example_each_epoch():
    pairs = [(torch.tensor([i, i]), torch.tensor([IGNORE_INDEX, i])) for i in range(10)]
    first = [ExampleBatches(pairs, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    epoch = [int(x) for i in range(3) for batches in first for x in batches.batch(i).inputs[:, 0]][:10]
    assert sorted(epoch) == list(range(10))  # the two ranks share each epoch's order: each example once
    resumed = ExampleBatches(pairs, 2, seed=1, rank=1, world_size=2, start=4)
    assert torch.equal(next(iter(resumed)).inputs, first[1].batch(4).inputs)
    assert not torch.equal(
        ExampleBatches(pairs, 2, seed=2).batch(0).inputs, ExampleBatches(pairs, 2, 1).batch(0).inputs
    )
