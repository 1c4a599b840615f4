"""The built-in tasks to fine-tune on: right answers, the same examples for a seed, splits that share no problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt_lightning.data.synthetic_tasks import SPLITS, is_synthetic, partition_of, synthetic_task, words_of
from gpt_lightning.evaluation import GenerationTask, resolve_task
from tests.conftest import make_play


def prompts(examples) -> list[str]:
    return [e.messages[0].content for e in examples]


def test_addition_answers_are_sums_and_the_splits_share_no_problem():
    task = synthetic_task("addition-2")
    splits = {split: task.examples(split, None, seed=1) for split in SPLITS}
    assert sum(len(examples) for examples in splits.values()) == 100 * 100  # all of them, once
    assert all(900 < len(splits[s]) < 1100 for s in ("val", "test")), {s: len(e) for s, e in splits.items()}
    seen = [set(prompts(examples)) for examples in splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for example in splits["train"][:50]:
        a, b = map(int, example.messages[0].content.split("+"))
        assert example.messages[1].content == str(a + b) and example.messages[1].role == "assistant"
    characters = {c for example in splits["test"] for message in example.messages for c in message.content}
    assert characters <= set(task.alphabet)


def test_a_seed_gives_the_same_examples_and_another_seed_others():
    task = synthetic_task("addition-3")
    first = task.examples("train", 300, seed=7)
    assert prompts(first) == prompts(task.examples("train", 300, seed=7))
    assert prompts(first) != prompts(task.examples("train", 300, seed=8))
    assert len(set(prompts(first))) == 300  # distinct
    assert all(partition_of(p) == "train" for p in prompts(first))
    test = prompts(task.examples("test", 300, seed=7))  # the same seed, another split: no problem in common
    assert not set(test) & set(prompts(task.examples("train", 5000, seed=7)))
    with pytest.raises(ValueError, match="draw at most"):
        task.examples("test", None, seed=7)  # 10^6 problems are drawn, never listed


def test_reverse_words_reverses_words_of_the_text(tmp_path: Path):
    path = tmp_path / "play.txt"
    path.write_text(make_play(300))
    task = synthetic_task(f"reverse-words:{path}")
    words = words_of(path.read_text())
    assert words and all(w.islower() and 3 <= len(w) <= 8 for w in words)
    examples = [e for split in SPLITS for e in task.examples(split, None, seed=0)]
    assert sorted(prompts(examples)) == words  # every word once, in one split
    assert all(e.messages[1].content == e.messages[0].content[::-1] for e in examples)
    assert is_synthetic(f"reverse-words:{path}") and is_synthetic("addition-2") and not is_synthetic("next-line")
    with pytest.raises(ValueError, match="not a built-in task"):
        synthetic_task("multiplication-2")


def test_evaluate_scores_a_tasks_test_split(tmp_path: Path):
    task = resolve_task("addition-2", seed=3)
    assert isinstance(task, GenerationTask) and task.name == "addition-2" and len(task.items) == 500
    assert all(partition_of(item.prompt) == "test" for item in task.items)
    assert task.items[0].answer == str(sum(map(int, task.items[0].prompt.split("+"))))
    assert task.source["synthetic"] == "addition-2" and task.source["split"] == "test"
