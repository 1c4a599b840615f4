"""Evaluation tasks: their items, and how they are read from local files.

A task file is JSONL, one JSON object a line (blank lines are skipped), every line one kind of item:

- multiple choice, HellaSwag's own rows, read unchanged: `{"ctx": str, "endings": [str, ...], "label": int}`
  (other fields are ignored). Each ending is scored after the context and a space, as build-nanogpt and
  lm-eval score HellaSwag.
- multiple choice, generic: `{"context": str, "choices": [str, ...], "label": int}`. Each choice is scored
  right after the context, exactly as written: put the space where the text has one (`" Paris"`).
  In both, `label` is the index of the right choice (an integer, or its digits as a string, as the Hugging
  Face copy of HellaSwag writes it), and there are at least two non-empty choices.
- generation: `{"prompt": str, "answer": str, "stop": str | [str, ...]}`: greedy decoding after the prompt
  until the first stop string (default `"\\n"`: an answer is one line; `[]`: none) or the token limit, then
  exact match after normalization (`scoring.normalize_answer`).

Any other file (one whose name does not end in `.jsonl`) is text for language modelling: bits per byte and
per character. The kind of a JSONL file is read from the fields of its first item; `KIND:PATH` names it,
with KIND one of multiple_choice, generation or lm (`lm:file.jsonl` models the JSONL file as text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from gpt_lightning.data.corpus import brief, json_objects, read_text, sha256_of

MULTIPLE_CHOICE, GENERATION, LANGUAGE_MODELLING = "multiple_choice", "generation", "language_modelling"
KIND_PREFIXES = {"multiple_choice": MULTIPLE_CHOICE, "generation": GENERATION, "lm": LANGUAGE_MODELLING}
DEFAULT_STOP = ("\n",)


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]  # as written; each is scored after the context and the delimiter
    label: int  # the index of the right choice
    where: str  # the file and line (or built-in task and item) that errors name
    delimiter: str = ""  # between the context and each choice: " " for HellaSwag (lm-eval's target_delimiter)


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answer: str
    stop: tuple[str, ...]  # decoding ends before the first of these strings; () only at the token limit
    where: str


@dataclass(frozen=True)
class MultipleChoiceTask:
    name: str
    items: list[ChoiceItem]
    source: dict[str, Any]  # where the items come from, for the record: a file and its sha256, or a generator
    kind: ClassVar[str] = MULTIPLE_CHOICE


@dataclass(frozen=True)
class GenerationTask:
    name: str
    items: list[GenerationItem]
    source: dict[str, Any]
    kind: ClassVar[str] = GENERATION


@dataclass(frozen=True)
class TextTask:
    name: str
    text: str
    source: dict[str, Any]
    kind: ClassVar[str] = LANGUAGE_MODELLING


Task = MultipleChoiceTask | GenerationTask | TextTask


class TaskFormatError(ValueError):
    """A task file that cannot be read: the message names the file, the line and the problem."""


@dataclass(frozen=True)
class _Format:
    kind: str
    fields: tuple[str, ...]  # required: context, choices, label; or prompt, answer
    description: str
    delimiter: str = ""


HELLASWAG = _Format(MULTIPLE_CHOICE, ("ctx", "endings", "label"), "a multiple-choice item in HellaSwag's format", " ")
CHOICES = _Format(MULTIPLE_CHOICE, ("context", "choices", "label"), "a multiple-choice item")
PROMPT = _Format(GENERATION, ("prompt", "answer"), "a generation item")
FORMATS = (HELLASWAG, CHOICES, PROMPT)


def split_kind(spec: str) -> tuple[str | None, Path]:
    """`KIND:PATH` -> (kind, path); a plain path -> (None, path)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in KIND_PREFIXES:
        return KIND_PREFIXES[prefix], Path(rest).expanduser()
    return None, Path(spec).expanduser()


def read_task(spec: str) -> Task:
    """The task in the file `spec` names (`PATH` or `KIND:PATH`, see the module's docstring), named after the
    file's stem, with the file's path and sha256 as its source."""
    kind, path = split_kind(spec)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist (or is not a file): check the path.")
    text = read_text(path, what="task file")
    source = {"path": str(path), "sha256": sha256_of(path)}
    if kind == LANGUAGE_MODELLING or (kind is None and path.suffix != ".jsonl"):
        return TextTask(path.stem, text, source)
    items = parse_jsonl(text, str(path), kind)
    if isinstance(items[0], ChoiceItem):
        return MultipleChoiceTask(path.stem, items, source)  # type: ignore[arg-type]
    return GenerationTask(path.stem, items, source)  # type: ignore[arg-type]


def parse_jsonl(text: str, name: str, kind: str | None = None) -> list[ChoiceItem] | list[GenerationItem]:
    """The items of a JSONL task's text; `name` (its path) and the line number head every error. The format is
    the first item's (or the first of `kind`'s formats that it fits)."""
    items: list[Any] = []
    found: _Format | None = None
    for where, row in json_objects(text, name, TaskFormatError, "item"):
        if found is None:
            found = _format_of(row, where, kind)
        items.append(_parse(row, found, where))
    if not items:
        raise TaskFormatError(f"{name} holds no items: write one JSON object a line (docs/evaluation.md).")
    return items


def _format_of(row: dict[str, Any], where: str, kind: str | None) -> _Format:
    candidates = [f for f in FORMATS if kind is None or f.kind == kind]
    for candidate in candidates:
        if candidate.fields[0] in row:
            return candidate
    expected = "; or ".join(f"{', '.join(f.fields)} ({f.description})" for f in candidates)
    what = {MULTIPLE_CHOICE: "a multiple-choice item", GENERATION: "a generation item"}.get(kind or "", "a task item")
    raise TaskFormatError(f"{where}: not {what}: it has {_fields(row)}, where one has {expected}.")


def _fields(row: dict[str, Any]) -> str:
    return ", ".join(sorted(row)) or "no fields"


def _parse(row: dict[str, Any], form: _Format, where: str) -> ChoiceItem | GenerationItem:
    missing = [f for f in form.fields if f not in row]
    if len(missing) == len(form.fields):
        raise TaskFormatError(f"{where}: not {form.description}: it has {_fields(row)}, where one has "
                              f"{', '.join(form.fields)} (every line of a file is one kind of item).")  # fmt: skip
    if missing:
        raise TaskFormatError(f"{where}: {form.description} lacks {missing[0]!r} (it has {_fields(row)}).")
    if form.kind == GENERATION:
        prompt, answer = _text(row, "prompt", where), row["answer"]
        if not isinstance(answer, str):
            raise TaskFormatError(f"{where}: answer must be a string, got {brief(answer)}.")
        return GenerationItem(prompt, answer, _stop(row.get("stop", list(DEFAULT_STOP)), where), where)
    context_field, choices_field, _ = form.fields
    context, choices = _text(row, context_field, where), row[choices_field]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskFormatError(
            f"{where}: {choices_field} must be a list of at least 2 non-empty strings, got {brief(choices)}."
        )
    label = row["label"]
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        raise TaskFormatError(f"{where}: label must be an integer, the index of the right choice, got {brief(label)}.")
    if not 0 <= label < len(choices):
        raise TaskFormatError(
            f"{where}: label {label} is not the index of one of its {len(choices)} choices (0 to {len(choices) - 1})."
        )
    return ChoiceItem(context, tuple(choices), label, where, form.delimiter)


def _text(row: dict[str, Any], field: str, where: str) -> str:
    value = row[field]
    if not isinstance(value, str) or not value:
        raise TaskFormatError(f"{where}: {field} must be a non-empty string, got {brief(value)}.")
    return value


def _stop(value: Any, where: str) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise TaskFormatError(
            f"{where}: stop must be a non-empty string or a list of them ([] stops at the token limit only), "
            f"got {brief(value)}."
        )
    return tuple(stops)
