"""Built-in tasks that need no download: multiple choice made from tiny Shakespeare's held-out split.

The split is the corpus's last 10% of characters (data.text_span [0.9, 1.0]): the validation split of a
character-level run with data.val_fraction 0.1, text that pre-training never trained on. It cuts into a
speech, so its first block is only ever context. Every item is made from the split alone by a generator
seeded with the task's name and `seed`, so a seed gives the same items on any machine. The items ship as
this code, never as corpus text. Every task has four choices: chance is 25%. One item per speech at most.

Two tasks ask what a character model learns first, words; two ask what it learns late, if ever, the plays:

- spelling: a word of the speech, in its context (the speech up to the word), against three misspellings
  of it of the same length: two adjacent letters swapped, or one letter (not the first) replaced by a letter
  drawn as often as letters occur in the split. No misspelling is a word of the split. The word is a
  lower-case word of at least SPELLING_MIN_LETTERS letters, drawn uniformly from the speech; each choice
  ends with the character that follows the word, so the model must also end it.
- next-word: the word that comes next in a speech against three other words of the split of the same
  length, each drawn as often as it occurs there, as the right word is, so that knowing which words are
  common is no help. The context is the speech up to the word; the word is a lower-case word of at least
  NEXT_WORD_MIN_LETTERS letters drawn uniformly from the speech.

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

from gpt_lightning.data.corpus import SPEECH_BREAK, VAL_FRACTION, ensure_corpus
from gpt_lightning.evaluation.tasks import ChoiceItem, MultipleChoiceTask

GENERATOR_VERSION = 1  # bump when a generator changes which items a seed gives
NUM_CHOICES = 4
MAX_LINE_CHARS = 48
WHO_SPEAKS_CHARS = 32
LENGTH_BUCKET = 4  # next-line's choices have lengths in one bucket of this many characters (0-3, 4-7, ...)
SPELLING_MIN_LETTERS = 5
NEXT_WORD_MIN_LETTERS = 3
_WORD = re.compile(r"(?<![A-Za-z'])[a-z]+(?![A-Za-z'])")  # a lower-case word, not part of a name or "o'er"
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
    blocks = [block.strip("\n") for block in SPEECH_BREAK.split(held_out)]
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
        items.append(_choice_item(_context_of(speech, i, 0), right, wrong, rng, f"next-line item {len(items)}"))
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


def _context_of(speech: _Speech, line: int, column: int) -> str:
    """The text before character `column` of the speech's line `line`: the block before it, a blank line, the
    speaker's name line, the lines spoken so far and the line's first `column` characters."""
    spoken = "".join(text + "\n" for text in speech.lines[:line])
    return f"{speech.before}\n\n{speech.name}:\n{spoken}{speech.lines[line][:column]}"


def _words_in(speech: _Speech, min_letters: int) -> list[tuple[int, re.Match[str]]]:
    """The speech's lower-case words of at least `min_letters` letters, as (line, match), in text order."""
    return [
        (i, match)
        for i, line in enumerate(speech.lines)
        for match in _WORD.finditer(line)
        if len(match.group()) >= min_letters
    ]


def _misspellings(word: str, words: set[str], letters: list[str], weights: list[int], rng: random.Random) -> list[str]:
    """Up to NUM_CHOICES - 1 different misspellings of `word` of its length that are not in `words`."""
    wrong: list[str] = []
    for _ in range(100 * NUM_CHOICES):
        # the first letter stays: a reader (and a model) knows a word by how it starts
        if rng.random() < 0.5:  # two adjacent letters swapped
            i = rng.randrange(1, len(word) - 1)
            candidate = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        else:  # one letter replaced
            i = rng.randrange(1, len(word))
            [letter] = rng.choices(letters, weights)
            candidate = word[:i] + letter + word[i + 1 :]
        if candidate not in words and candidate not in wrong:
            wrong.append(candidate)
            if len(wrong) == NUM_CHOICES - 1:
                break
    return wrong


def spelling(held_out: str, seed: int) -> list[ChoiceItem]:
    """The spelling items of the held-out text (see the module's docstring)."""
    rng = random.Random(f"spelling/{seed}")
    speeches = _speeches(held_out)
    words = set(_WORD.findall(held_out))
    letter_counts = Counter(c for c in held_out if "a" <= c <= "z")
    letters = sorted(letter_counts)
    weights = [letter_counts[c] for c in letters]
    items: list[ChoiceItem] = []
    for speech in speeches:
        candidates = _words_in(speech, SPELLING_MIN_LETTERS)
        if not candidates:
            continue
        i, match = rng.choice(candidates)
        word = match.group()
        wrong = _misspellings(word, words, letters, weights, rng)
        if len(wrong) < NUM_CHOICES - 1:
            continue
        after = (speech.lines[i] + "\n")[match.end()]  # the space, punctuation or line end that follows
        context = _context_of(speech, i, match.start())
        right, *wrong = (w + after for w in [word, *wrong])
        items.append(_choice_item(context, right, wrong, rng, f"spelling item {len(items)}"))
    return items


def next_word(held_out: str, seed: int) -> list[ChoiceItem]:
    """The next-word items of the held-out text (see the module's docstring)."""
    rng = random.Random(f"next-word/{seed}")
    speeches = _speeches(held_out)
    counts = Counter(w for w in _WORD.findall(held_out) if len(w) >= NEXT_WORD_MIN_LETTERS)
    by_length: dict[int, list[str]] = {}
    for word in sorted(counts):
        by_length.setdefault(len(word), []).append(word)
    items: list[ChoiceItem] = []
    for speech in speeches:
        candidates = _words_in(speech, NEXT_WORD_MIN_LETTERS)
        if not candidates:
            continue
        i, match = rng.choice(candidates)
        right = match.group()
        others = [word for word in by_length[len(right)] if word != right]
        if len(others) < NUM_CHOICES - 1:
            continue
        weights = [counts[word] for word in others]
        wrong: list[str] = []
        for _ in range(100 * NUM_CHOICES):  # as often as they occur, as the right word is drawn
            [word] = rng.choices(others, weights)
            wrong += [] if word in wrong else [word]
            if len(wrong) == NUM_CHOICES - 1:
                break
        else:
            continue  # too few other words of this length that occur often enough to be drawn
        context = _context_of(speech, i, match.start())
        items.append(_choice_item(context, right, wrong, rng, f"next-word item {len(items)}"))
    return items


def _first_words(line: str, max_chars: int) -> str:
    """The line's longest run of whole first words that fits `max_chars` (at least its first word)."""
    if len(line) <= max_chars:
        return line
    cut = line.rfind(" ", 0, max_chars + 1)
    return line[:cut] if cut > 0 else line.split(" ", 1)[0]


BUILTIN_TASKS: dict[str, Callable[[str, int], list[ChoiceItem]]] = {
    "spelling": spelling,
    "next-word": next_word,
    "next-line": next_line,
    "who-speaks": who_speaks,
}


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
