"""Task data for fine-tuning: prompt/response examples, the template that turns them into model input, and
their tokens with the loss on the responses only. Plain PyTorch (docs/fine-tuning.md, "Teach it a task").

A task file is JSONL, one example a line (blank lines are skipped), in one of three formats:

- instruction: `{"instruction": str, "input": str (optional), "output": str}` (Alpaca, litgpt). The prompt
  is the instruction, then a blank line and the input when there is one;
- completion: `{"prompt": str, "completion": str}` (TRL's prompt-completion, strings only);
- messages: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` (chat, multi-turn;
  a system message only first, the last message the assistant's).

The format is the first example's (or declared); every line must have it. A bad line is a `TaskDataError`
that names the file, the line number and the problem.

A `Template` says how a conversation becomes text: a prefix per role, what ends a user or system turn, the
end-of-response marker that ends an assistant turn (the model learns to emit it; generation stops at it),
and a separator between turns. By default only the assistant turns' content and end marker are learned: the
targets of every other token are IGNORE_INDEX, which the loss leaves out, so they contribute nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from gpt_lightning.data.corpus import brief, json_objects, read_text
from gpt_lightning.tokenizer import CharTokenizer, Tokenizer

IGNORE_INDEX = -100  # the target of a token that is not learned (a prompt's, padding): cross_entropy's default
ROLES = ("system", "user", "assistant")
Format = Literal["auto", "instruction", "completion", "messages"]
FORMAT_FIELDS = {"instruction": ("instruction", "output"), "completion": ("prompt", "completion"),
                 "messages": ("messages",)}  # fmt: skip


class TaskDataError(ValueError):
    """Task data that cannot be used: the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Message:
    role: str  # system, user or assistant
    content: str


@dataclass(frozen=True)
class Example:
    messages: tuple[Message, ...]  # a system message only first, the last one the assistant's
    where: str  # the file and line (or task and item) that errors name


# -- reading ---------------------------------------------------------------------------------------------------


def read_examples(path: str | Path, form: Format = "auto") -> list[Example]:
    """The examples of a JSONL task file (see the module's docstring)."""
    return parse_examples(read_text(path, what="task file"), str(path), form)


def parse_examples(text: str, name: str, form: Format = "auto") -> list[Example]:
    """The examples of a JSONL text; `name` (its path) and the line number head every error."""
    if form != "auto" and form not in FORMAT_FIELDS:
        raise TaskDataError(f"data.format must be auto, {', '.join(FORMAT_FIELDS)}; got {form!r}.")
    examples = []
    found: str | None = None if form == "auto" else form
    for where, row in json_objects(text, name, TaskDataError, "example"):
        found = found or detect_format(row, where)
        examples.append(parse_example(row, found, where))
    if not examples:
        raise TaskDataError(f"{name} holds no examples: write one JSON object a line (docs/fine-tuning.md).")
    return examples


def detect_format(row: Mapping[str, Any], where: str) -> str:
    """The format whose first field the row has."""
    for form, fields in FORMAT_FIELDS.items():
        if fields[0] in row:
            return form
    raise TaskDataError(f"{where}: not a task example: it has {_fields(row)}, where one has {_expected()}.")


def parse_example(row: Mapping[str, Any], form: str, where: str) -> Example:
    """One example of the format `form`."""
    missing = [field for field in FORMAT_FIELDS[form] if field not in row]
    if missing:
        raise TaskDataError(f"{where}: a {form} example lacks {missing[0]!r} (it has {_fields(row)}); every line "
                            f"of a file has one format: {_expected()}.")  # fmt: skip
    if form == "messages":
        return Example(_messages(row["messages"], where), where)
    if form == "instruction":
        instruction, output = _string(row, "instruction", where), _string(row, "output", where)
        extra = _string(row, "input", where) if row.get("input") is not None else ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
    else:
        prompt, output = _string(row, "prompt", where), _string(row, "completion", where)
    return Example((Message("user", prompt), Message("assistant", output)), where)


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise TaskDataError(f"{where}: messages must be a non-empty list of {{role, content}} objects, "
                            f"got {brief(value)}.")  # fmt: skip
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TaskDataError(f"{where}: message {i} must be an object with role and content, got {brief(message)}.")
        role = message["role"]
        if role not in ROLES:
            raise TaskDataError(f"{where}: message {i} has role {brief(role)}: one of {', '.join(ROLES)}.")
        if role == "system" and i > 0:
            raise TaskDataError(f"{where}: message {i} is a system message: only the first message may be one.")
        if not isinstance(message["content"], str):
            raise TaskDataError(f"{where}: message {i}'s content must be a string, got {brief(message['content'])}.")
        messages.append(Message(role, message["content"]))
    if messages[-1].role != "assistant":
        raise TaskDataError(f"{where}: the last message is the {messages[-1].role}'s: an example ends with the "
                            "assistant's reply, the text to learn.")  # fmt: skip
    return tuple(messages)


def _string(row: Mapping[str, Any], field: str, where: str) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: {field} must be a string, got {brief(value)}.")
    return value


def _fields(row: Mapping[str, Any]) -> str:
    return ", ".join(sorted(row)) or "no fields"


def _expected() -> str:
    return "; or ".join(f"{', '.join(fields)} ({form})" for form, fields in FORMAT_FIELDS.items())


# -- templates -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """How a conversation becomes text. A turn is its role's prefix, its content and, for the assistant, the
    end marker (for the others, turn_end); turns are joined by the separator. A prompt ends with the assistant's
    prefix, so that the model answers after it."""

    name: str
    system: str  # before a system message
    user: str  # before a user message
    assistant: str  # before an assistant message: the prompt ends here
    turn_end: str  # after a system or user message
    end: str  # after an assistant message: the end-of-response marker, learned and where generation stops
    separator: str  # between turns

    def __post_init__(self) -> None:
        if not self.end:
            raise ValueError(f"template {self.name}: the end marker must not be empty (generation stops at it).")

    @property
    def is_chat(self) -> bool:
        """Whether every role has a marker, so that each turn of a conversation reads apart: a model fine-tuned
        in such a template is a chat model (`serve` answers /v1/chat/completions for it)."""
        return all((self.system, self.user, self.assistant))

    @property
    def markers(self) -> str:
        """Every character the template writes itself, for vocabulary checks."""
        return self.system + self.user + self.assistant + self.turn_end + self.end + self.separator

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, str]) -> Template:
        return cls(**{field.name: state[field.name] for field in dataclasses.fields(cls)})


# Markers of "plain" use only characters of tiny Shakespeare's 65, so a character model pre-trained on it can
# learn a task in it; "chat" is ChatML-like, for BPE models (and character models whose vocabulary has <, |, >).
TEMPLATES = {
    "plain": Template("plain", system="", user="Q: ", assistant="A: ", turn_end="", end="$", separator="\n"),
    "chat": Template(
        "chat",
        system="<|system|>\n",
        user="<|user|>\n",
        assistant="<|assistant|>\n",
        turn_end="<|end|>",
        end="<|end|>",
        separator="\n",
    ),
}


def template_named(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"data.template {name!r} is not a template: choose one of {', '.join(TEMPLATES)}.")
    return TEMPLATES[name]


def segments(template: Template, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The conversation as text pieces (text, learned): an assistant turn's content and end marker are learned,
    everything else (prefixes, other turns, separators) is prompt."""
    pieces: list[tuple[str, bool]] = []
    for i, message in enumerate(messages):
        before = template.separator if i else ""
        if message.role == "assistant":
            pieces += [(before + template.assistant, False), (message.content + template.end, True)]
        else:
            prefix = template.system if message.role == "system" else template.user
            pieces.append((before + prefix + message.content + template.turn_end, False))
    return pieces


def render_prompt(template: Template | None, prompt: str | Sequence[Message | Mapping[str, str]]) -> str:
    """The text a model reads for a prompt (one user message) or a conversation that ends with a user message:
    the turns, then the assistant's prefix, where the model answers. Without a template (a base model) a
    prompt is returned as it is, and a conversation is an error."""
    if template is None:
        if isinstance(prompt, str):
            return prompt
        raise ValueError("this model has no template (it was not fine-tuned on task data): send a prompt.")
    if isinstance(prompt, str):
        messages: list[Message] = [Message("user", prompt)]
    else:
        messages = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in prompt]
    if not messages or messages[-1].role == "assistant" or any(m.role not in ROLES for m in messages):
        raise ValueError(f"a conversation to answer is system and user messages ({', '.join(ROLES)}), the last "
                         "one not the assistant's.")  # fmt: skip
    text = "".join(piece for piece, _ in segments(template, messages))
    return text + template.separator + template.assistant


def chat_template(template: Template) -> str:
    """The template as a Hugging Face chat template (Jinja): `tokenizer.apply_chat_template(messages,
    add_generation_prompt=True)` on an exported folder gives `render_prompt(template, messages)`."""

    def text(value: str) -> str:  # markers written verbatim, whatever they hold
        return "{% raw %}" + value + "{% endraw %}" if value else ""

    content = "{{ message['content'] }}"
    turns = {
        "assistant": text(template.assistant) + content + text(template.end),
        "system": text(template.system) + content + text(template.turn_end),
        "user": text(template.user) + content + text(template.turn_end),
    }
    return "".join([
        "{% for message in messages %}",
        "{% if not loop.first %}", text(template.separator), "{% endif %}",
        "{% if message['role'] == 'assistant' %}", turns["assistant"],
        "{% elif message['role'] == 'system' %}", turns["system"],
        "{% else %}", turns["user"], "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}", text(template.separator + template.assistant), "{% endif %}",
    ])  # fmt: skip


# -- tokens ----------------------------------------------------------------------------------------------------


def encode_example(
    tokenizer: Tokenizer, template: Template, example: Example, train_on_prompt: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (L - 1,), targets (L - 1,)) of the example's L tokens: targets are the next tokens, IGNORE_INDEX
    where the next token is not learned (the prompt's, unless `train_on_prompt`). Each piece is encoded on its
    own, so a BPE token never spans prompt and response."""
    ids, learned = [], []
    for text, is_learned in segments(template, example.messages):
        piece = tokenizer.encode(text)
        ids.append(piece)
        learned.append(torch.full((piece.numel(),), is_learned or train_on_prompt))
    tokens, mask = torch.cat(ids), torch.cat(learned)
    targets = torch.where(mask[1:], tokens[1:], IGNORE_INDEX)
    return tokens[:-1], targets


def missing_characters(tokenizer: Tokenizer, template: Template, examples: Iterable[Example]) -> dict[str, str]:
    """{character: where it first occurs} for the characters of the template and the examples that a character
    vocabulary lacks ({} for BPE, which encodes any text)."""
    if not isinstance(tokenizer, CharTokenizer):
        return {}
    missing = dict.fromkeys(tokenizer.unknown_chars(template.markers), f"template {template.name}")
    for example in examples:
        for message in example.messages:
            for char in tokenizer.unknown_chars(message.content):
                missing.setdefault(char, example.where)
    return missing


class TaskBatch(NamedTuple):
    """A batch of examples: inputs and targets (B, T), and each row's real tokens (B,), the rest padding. A row
    holds one example (`collate`), or several (`pack`), whose `segments` (B, T) say which: the example's index
    in the batch, -1 for padding."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    segments: torch.Tensor | None = None

    @property
    def padding(self) -> float:
        """The fraction of the batch's positions that are padding."""
        return 1.0 - self.lengths.sum().item() / self.inputs.numel()


def collate(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> TaskBatch:
    """Pads (inputs, targets) pairs to the longest: inputs with token 0 (never a target, and after every real
    token, so causal attention keeps it out of their logits), targets with IGNORE_INDEX."""
    lengths = torch.tensor([x.numel() for x, _ in pairs])
    width = int(lengths.max())
    inputs = torch.zeros(len(pairs), width, dtype=torch.long)
    targets = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        inputs[row, : x.numel()], targets[row, : y.numel()] = x, y
    return TaskBatch(inputs, targets, lengths)


def first_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows of at most `width` tokens that hold examples of these lengths, as indices into `lengths`: the
    longest first, each into the first row with room (first-fit decreasing, within 11/9 of the fewest rows).
    Ties keep their order, so the rows depend on the lengths and their order alone."""
    rows: list[list[int]] = []
    room: list[int] = []  # each row's free tokens
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > width:
            raise ValueError(f"an example of {lengths[i]} tokens is longer than the rows of {width} to pack it in.")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(width)
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """`first_fit` rows of at most `width` tokens for examples of these lengths, at the row width that leaves the
    fewest padded positions. The widest rows are not always best: every row is padded to the fullest, so one full
    row of short examples pads rows of a few long ones that leave room no example fits. Tried: the total of the
    k longest examples for k = 1, 2, ... up to `width`; the first, the longest example's, never pads more than
    one example a row (`collate`)."""
    longest_first, widths = sorted(lengths, reverse=True), []
    for k in range(1, len(lengths) + 1):
        widths.append(min(width, sum(longest_first[:k])))
        if widths[-1] == width:
            break
    packings = [first_fit(lengths, w) for w in widths]
    return min(packings, key=lambda rows: len(rows) * max(sum(lengths[i] for i in row) for row in rows))


def pack(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int) -> TaskBatch:
    """Packs (inputs, targets) pairs into rows of at most `width` tokens (`pack_rows`), padded to the fullest
    row. `segments` names each position's pair (its index in `pairs`), and the model reads each pair as if
    alone (model.packed_attention): the batch's loss is `collate`'s, over fewer positions. Padding, -1, is a
    segment of its own that no example sees."""
    rows = pack_rows([x.numel() for x, _ in pairs], width)
    lengths = [sum(pairs[i][0].numel() for i in row) for row in rows]
    shape = (len(rows), max(lengths))
    inputs = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            x, y = pairs[i]
            end = start + x.numel()
            inputs[r, start:end], targets[r, start:end], segments[r, start:end] = x, y, i
            start = end
    return TaskBatch(inputs, targets, torch.tensor(lengths), segments)


class ExampleBatches(IterableDataset):
    """An endless stream of training batches of examples, each padded to its longest (`collate`) or, given a
    `width`, packed into rows of that many tokens (`pack`). The examples are taken in a fresh random order each
    epoch, shared by all ranks: batch i of rank r of a world of w processes holds the examples at positions
    (i * w + r) * batch_size onwards of the epochs' orders, so the ranks take different examples, every example
    is seen once an epoch, and batch i depends only on (seed, r, w, i): a run resumed at batch i takes exactly
    what an uninterrupted run would have."""

    def __init__(
        self,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        width: int | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("no training examples.")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world_size, self.start, self.width = rank, world_size, start, width
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if len(self._orders) > 1:
                self._orders.pop(min(self._orders))
            generator = torch.Generator().manual_seed(hash((self.seed, epoch)) & (2**63 - 1))
            self._orders[epoch] = torch.randperm(len(self.pairs), generator=generator)
        return self._orders[epoch]

    def examples(self, index: int) -> list[int]:
        """The examples of batch `index`, as indices into the pairs."""
        first = (index * self.world_size + self.rank) * self.batch_size
        n = len(self.pairs)
        return [int(self._order(p // n)[p % n]) for p in range(first, first + self.batch_size)]

    def batch(self, index: int) -> TaskBatch:
        pairs = [self.pairs[i] for i in self.examples(index)]
        return collate(pairs) if self.width is None else pack(pairs, self.width)

    def padding(self, batches: int) -> float:
        """The share of padded positions in the stream's first `batches` batches, from the examples' lengths
        alone (no batch is built)."""
        real = positions = 0
        for index in range(self.start, self.start + batches):
            lengths = [self.pairs[i][0].numel() for i in self.examples(index)]
            rows = lengths  # each row's tokens: one example a row, or the pack's
            if self.width is not None:
                rows = [sum(lengths[i] for i in row) for row in pack_rows(lengths, self.width)]
            real += sum(lengths)
            positions += len(rows) * max(rows)  # each row padded to the longest
        return 1 - real / positions

    def __iter__(self) -> Iterator[TaskBatch]:
        info = get_worker_info()  # DataLoader workers take turns: worker k of K serves batches k, k + K, ...
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while True:
            yield self.batch(index)
            index += workers
