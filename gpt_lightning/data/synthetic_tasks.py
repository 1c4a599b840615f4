"""Built-in tasks to fine-tune on, generated offline as code: 2- and 3-digit addition, and reversing words drawn
from a text. Plain Python.

- addition-2, addition-3: `a+b` -> its sum, for a and b from 0 to 99 (999): 10^4 (10^6) problems. Tiny
  Shakespeare's characters hold no digit but 3 and no `+`: a character model pre-trained on it cannot read
  these (fine-tune one from scratch, whose vocabulary is the task's, or a BPE model).
- reverse-words: a word -> the word reversed, for the distinct lower-case words of 3 to MAX_WORD_LETTERS
  letters of a text: the corpus (`reverse-words`, tiny Shakespeare under data_dir) or your own
  (`reverse-words:PATH`). Letters only, so a character model of the corpus reads it.

Every problem falls in one partition, train (80%), val (10%) or test (10%), by a hash of the problem alone,
so the splits never share a problem whatever is drawn from them. A split's examples are drawn from its
partition by a generator seeded with the task, the split and a seed (`addition-2/train/1337`): a seed gives
the same examples on any machine, and no two splits draw from one stream.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpt_lightning.data.corpus import ensure_corpus, read_text
from gpt_lightning.data.instruct import Example, Message

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}  # of a task's problems, by partition_of
MAX_WORD_LETTERS = 8
TEST_EXAMPLES = 500  # the test set `evaluate` scores (or the whole test partition, if smaller)
_WORD = re.compile(rf"(?<![A-Za-z'])[a-z]{{3,{MAX_WORD_LETTERS}}}(?![A-Za-z'])")


def partition_of(problem: str) -> Split:
    """The partition a problem belongs to, from its text alone: test 10%, val 10%, train 80%."""
    bucket = hashlib.blake2b(problem.encode(), digest_size=8).digest()[0] % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


@dataclass(frozen=True)
class SyntheticTask:
    """A task whose problems are (prompt, answer) pairs made by code."""

    name: str
    alphabet: str  # every character its prompts and answers use
    problems: Callable[[], list[tuple[str, str]]] | None  # all of them, where few enough to list
    draw: Callable[[random.Random], tuple[str, str]] | None = None  # one at random, where too many to list
    size: int = 0  # how many problems there are

    def examples(self, split: Split, n: int | None, seed: int) -> list[Example]:
        """Up to `n` distinct problems of the split's partition (all of them for None), in the order drawn."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
        if n is not None and n < 1:
            raise ValueError(f"a task split needs n >= 1 examples, got {n}.")
        rng = random.Random(f"{self.name}/{split}/{seed}")  # a string seed: the same draws everywhere
        if self.problems is not None:
            chosen = [p for p in self.problems() if partition_of(p[0]) == split]
            rng.shuffle(chosen)
            chosen = chosen[:n]
        else:  # too many to list: distinct draws, at most a quarter of the partition so that few repeat
            assert self.draw is not None
            most = int(self.size * SHARES[split]) // 4
            if n is None or n > most:
                raise ValueError(f"{self.name} has {self.size:,} problems: draw at most {most:,} of its {split} "
                                 f"split, not {'all' if n is None else f'{n:,}'}.")  # fmt: skip
            chosen = list(_distinct(self.draw, rng, split, n))
        return [
            Example((Message("user", prompt), Message("assistant", answer)), f"{self.name} {split} item {i}")
            for i, (prompt, answer) in enumerate(chosen)
        ]


def _distinct(
    draw: Callable[[random.Random], tuple[str, str]], rng: random.Random, split: Split, n: int
) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    while len(seen) < n:
        prompt, answer = draw(rng)
        if prompt not in seen and partition_of(prompt) == split:
            seen.add(prompt)
            yield prompt, answer


def _addition(digits: int) -> SyntheticTask:
    top = 10**digits

    def problems() -> list[tuple[str, str]]:
        return [(f"{a}+{b}", str(a + b)) for a in range(top) for b in range(top)]

    def draw(rng: random.Random) -> tuple[str, str]:
        a, b = rng.randrange(top), rng.randrange(top)
        return f"{a}+{b}", str(a + b)

    listed = top * top <= 10**4
    return SyntheticTask(f"addition-{digits}", "0123456789+", problems if listed else None, draw, top * top)


def words_of(text: str) -> list[str]:
    """The distinct lower-case words of 3 to MAX_WORD_LETTERS letters of a text (not part of a name or of o'er)."""
    return sorted(set(_WORD.findall(text)))


def _reverse_words(text: str, name: str) -> SyntheticTask:
    words = words_of(text)
    if not words:
        raise ValueError(f"{name}: the text has no lower-case words of 3 to {MAX_WORD_LETTERS} letters to reverse.")
    alphabet = "".join(sorted(set("".join(words))))
    return SyntheticTask(name, alphabet, lambda: [(word, word[::-1]) for word in words], size=len(words))


TASK_NAMES = ("addition-2", "addition-3", "reverse-words")


def is_synthetic(spec: str) -> bool:
    """Whether `spec` names a built-in synthetic task: addition-2, addition-3, reverse-words[:PATH]."""
    return spec in TASK_NAMES or spec.startswith("reverse-words:")


def synthetic_task(spec: str, data_dir: str | Path = "data") -> SyntheticTask:
    """The task `spec` names: addition-2, addition-3, reverse-words (words of the corpus under data_dir,
    downloaded once when missing) or reverse-words:PATH (words of your text file)."""
    if spec == "addition-2":
        return _addition(2)
    if spec == "addition-3":
        return _addition(3)
    if spec == "reverse-words":
        return _reverse_words(ensure_corpus(data_dir).read_text(encoding="utf-8"), spec)
    if spec.startswith("reverse-words:"):
        path = spec.partition(":")[2]
        return _reverse_words(read_text(Path(path).expanduser(), what="reverse-words text"), spec)
    raise ValueError(f"{spec!r} is not a built-in task: choose one of {', '.join(TASK_NAMES)} (or reverse-words:PATH).")
