"""Built-in tasks that need no download: multiple choice made from tiny Shakespeare's held-out split.

The split is the corpus's last 10% of characters (data.text_span [0.9, 1.0]): the validation split of a
character-level run with data.val_fraction 0.1, text that pre-training never trained on. It cuts into a
speech, so its first block is only ever context. Every item is made from the split alone by a generator
seeded with the task's name and `seed`, so a seed gives the same items on any machine. The items ship as
this code, never as corpus text. Both tasks have four choices: chance is 25%.

- next-line: the real next line of a speech against three lines drawn from other speeches of the split,
  all four with lengths in one bucket (LENGTH_BUCKET characters wide, fixed boundaries) so that length tells
  nothing (drawn from lines of any length, the shortest choice was right 32.5% of the time, and the CPU
  recipe's model scored just that). The context is the speech before it, a blank line, the speaker's name
  line and the lines spoken so far; the line to choose (at most MAX_LINE_CHARS) is drawn uniformly.
- who-speaks: who says this? A speech's speaker against three other speakers of the split, each drawn as
  often as it speaks there, as the right speaker is, so that knowing who speaks most is no help. The
  context is the speech before it and a blank line; each choice is a name line and the speech's first words
  (up to WHO_SPEAKS_CHARS characters), as the text writes them, so the model weighs name and words together.

Choices stay short (at most about 50 characters) so that a character model with the CPU recipe's block_size
of 64 sees a context before every one of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from gpt_lightning.data import VAL_FRACTION, ensure_corpus
from gpt_lightning.evaluation.tasks import ChoiceItem, MultipleChoiceTask

GENERATOR_VERSION = 1  # bump when a generator changes which items a seed gives
NUM_CHOICES = 4
MAX_LINE_CHARS = 48
WHO_SPEAKS_CHARS = 32
LENGTH_BUCKET = 4  # next-line's choices have lengths in one bucket of this many characters (0-3, 4-7, ...)
_SPEECH_BREAK = re.compile(r"\n\s*\n")  # as data.speeches_of splits speeches
_NAME_LINE = re.compile(r"[^\s:][^:\n]*:")


def held_out_text(text: str, val_fraction: float = VAL_FRACTION) -> str:
    """The last `val_fraction` of the text's characters: the validation split of a character-level run on it
    (the same cut as data.text_span [1 - val_fraction, 1.0] and the data module's split)."""
    return text[int(len(text) * (1.0 - val_fraction)) :]


@dataclasses.dataclass(frozen=True)
class _Speech:
    before: str  # the block before it: the previous speech (or the split's first fragment)
    name: str  # the speaker, as written
    lines: tuple[str, ...]


def _speeches(held_out: str) -> list[_Speech]:
    blocks = [block.strip("\n") for block in _SPEECH_BREAK.split(held_out)]
    speeches = []
    for before, block in itertools.pairwise(blocks):  # the first block is a fragment: context, never an item
        name_line, *lines = block.split("\n")
        if _NAME_LINE.fullmatch(name_line) and lines and all(line.strip() for line in lines):
            speeches.append(_Speech(before, name_line[:-1], tuple(lines)))
    return speeches


def _choice_item(context: str, right: str, wrong: list[str], rng: random.Random, where: str) -> ChoiceItem:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return ChoiceItem(context, tuple(choices), choices.index(right), where)


def next_line(held_out: str, seed: int) -> list[ChoiceItem]:
    """The next-line items of the held-out text (see the module's docstring)."""
    rng = random.Random(f"next-line/{seed}")  # a string seed: the same draws on every platform and Python
    speeches = _speeches(held_out)
    by_bucket: dict[int, list[tuple[int, str]]] = {}  # lines by length // LENGTH_BUCKET, in text order
    for k, s in enumerate(speeches):
        for line in s.lines:
            if len(line) <= MAX_LINE_CHARS:
                by_bucket.setdefault(len(line) // LENGTH_BUCKET, []).append((k, line))
    items: list[ChoiceItem] = []
    for k, speech in enumerate(speeches):
        positions = [i for i, line in enumerate(speech.lines) if len(line) <= MAX_LINE_CHARS]
        if not positions:
            continue
        i = rng.choice(positions)
        right = speech.lines[i]
        near = by_bucket[len(right) // LENGTH_BUCKET]
        wrong: list[str] = []
        for _ in range(100 * NUM_CHOICES):  # a draw from this speech, or a repeat, is drawn again
            j, line = rng.choice(near)
            if j != k and line != right and line not in wrong:
                wrong.append(line)
                if len(wrong) == NUM_CHOICES - 1:
                    break
        else:
            continue  # too few other lines of about this length
        context = f"{speech.before}\n\n{speech.name}:\n" + "".join(line + "\n" for line in speech.lines[:i])
        items.append(_choice_item(context, right, wrong, rng, f"next-line item {len(items)}"))
    return items


def who_speaks(held_out: str, seed: int) -> list[ChoiceItem]:
    """The who-speaks items of the held-out text (see the module's docstring)."""
    rng = random.Random(f"who-speaks/{seed}")
    speeches = _speeches(held_out)
    counts = Counter(speech.name for speech in speeches)
    names = sorted(counts)
    items: list[ChoiceItem] = []
    for speech in speeches:
        others = [name for name in names if name != speech.name]
        if len(others) < NUM_CHOICES - 1:
            continue
        weights = [counts[name] for name in others]
        wrong: list[str] = []
        for _ in range(100 * NUM_CHOICES):  # as often as they speak, as the right speaker is drawn
            [name] = rng.choices(others, weights)
            wrong += [] if name in wrong else [name]
            if len(wrong) == NUM_CHOICES - 1:
                break
        else:
            continue  # too few other speakers who speak often enough to be drawn
        words = _first_words(speech.lines[0], WHO_SPEAKS_CHARS)
        chosen = [speech.name, *wrong]
        right, *wrong = (f"{name}:\n{words}" for name in chosen)
        items.append(_choice_item(f"{speech.before}\n\n", right, wrong, rng, f"who-speaks item {len(items)}"))
    return items


def _first_words(line: str, max_chars: int) -> str:
    """The line's longest run of whole first words that fits `max_chars` (at least its first word)."""
    if len(line) <= max_chars:
        return line
    cut = line.rfind(" ", 0, max_chars + 1)
    return line[:cut] if cut > 0 else line.split(" ", 1)[0]


BUILTIN_TASKS: dict[str, Callable[[str, int], list[ChoiceItem]]] = {"next-line": next_line, "who-speaks": who_speaks}


def builtin_task(name: str, data_dir: str = "data", seed: int = 1337) -> MultipleChoiceTask:
    """The built-in task `name`, made from the corpus under `data_dir` (downloaded once when missing). Its
    source records the corpus's sha256, the generator and its version, the seed, and the items' sha256."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"{name!r} is not a built-in task: choose one of {', '.join(BUILTIN_TASKS)}.")
    path = ensure_corpus(data_dir)
    raw = path.read_bytes()
    generator = BUILTIN_TASKS[name]
    items = generator(held_out_text(raw.decode("utf-8")), seed)
    if not items:
        raise ValueError(f"{path} has no held-out speeches to make the {name} task of.")
    items_json = json.dumps([dataclasses.asdict(item) for item in items], ensure_ascii=False)
    source: dict[str, Any] = {
        "builtin": name,
        "generator": f"{generator.__module__}.{generator.__name__}",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "corpus": str(path),
        "corpus_sha256": hashlib.sha256(raw).hexdigest(),
        "split": f"the corpus's last {VAL_FRACTION:.0%} of characters (data.text_span [{1 - VAL_FRACTION:g}, 1.0])",
        "items_sha256": hashlib.sha256(items_json.encode()).hexdigest(),
    }
    return MultipleChoiceTask(name, items, source)
