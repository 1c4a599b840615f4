"""Scoring items with a model: one result per item (or per window of a text), so that a caller can split the
items across processes, gather the results and aggregate them once (`metrics`). Plain PyTorch.

Multiple choice: each choice's tokens are scored after the context's (context and choice encoded apart, as
build-nanogpt does); only the choice's tokens count. The context passes through the model once: its keys and
values are cached, copied to one row per choice, and the choices run as one right-padded batch after it.
That is exact, since the padding comes after every real token and attention is causal. Where the context
and the longest choice do not fit block_size, each choice is run with the context instead, cropped on the
left to fit (the way a model reads any text longer than its window).

Generation: greedy decoding (temperature 0, the KV cache) until a stop string or the token limit.

Language modelling: windows of block_size tokens over the text; each scores the tokens no earlier window
scored (see `text_windows`), and every token but the first, which nothing predicts, is scored once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt_lightning.evaluation.tasks import ChoiceItem, GenerationItem
from gpt_lightning.model import GPT
from gpt_lightning.sampling import generate_tokens
from gpt_lightning.tokenizer import StreamDecoder, Tokenizer

IGNORE = -100  # the target of a padded position: cross_entropy leaves it out


@contextlib.contextmanager
def evaluating(model: GPT) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd, restoring the model's mode after: a callback scores mid-training."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device


def encode_text(tokenizer: Tokenizer, text: str, what: str) -> torch.Tensor:
    tokenizer.check(text, what)  # a character outside the vocabulary: an error that names the item
    return tokenizer.encode(text)


# -- multiple choice ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceScore:
    label: int
    losses: tuple[float, ...]  # each choice's summed cross-entropy (nats) given the context
    tokens: tuple[int, ...]  # each choice's tokens (HellaSwag: with the space before it)
    bytes: tuple[int, ...]  # each choice's UTF-8 bytes as written (HellaSwag: without the space), as lm-eval
    where: str
    greedy: tuple[bool, ...]  # each choice is what greedy decoding writes after the context (lm-eval's is_greedy)


def score_choices(
    model: GPT, tokenizer: Tokenizer, items: Sequence[ChoiceItem], batch_size: int = 8
) -> list[ChoiceScore]:
    """The loss of every choice of every item; `batch_size` choices run at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    with evaluating(model):
        return [_score_item(model, tokenizer, item, batch_size) for item in items]


def _score_item(model: GPT, tokenizer: Tokenizer, item: ChoiceItem, batch_size: int) -> ChoiceScore:
    block_size = model.config.block_size
    context = encode_text(tokenizer, item.context, f"{item.where}: the context")
    endings = [
        encode_text(tokenizer, item.delimiter + choice, f"{item.where}: choice {i}")
        for i, choice in enumerate(item.choices)
    ]
    for i, ending in enumerate(endings):
        if not 0 < ending.numel() <= block_size or context.numel() == 0:
            raise ValueError(
                f"{item.where}: choice {i} is {ending.numel()} tokens after a context of {context.numel()}: the model "
                f"(block_size {block_size}) scores choices of 1 to {block_size} tokens after a non-empty context."
            )
    # the last token of a choice is predicted, never fed: context + longest choice - 1 positions
    if context.numel() + max(e.numel() for e in endings) - 1 <= block_size:
        scored = _after_one_context(model, context, endings, batch_size)
    else:
        scored = _as_whole_sequences(model, context, endings, batch_size)
    return ChoiceScore(
        label=item.label,
        losses=tuple(loss for loss, _ in scored),
        tokens=tuple(e.numel() for e in endings),
        bytes=tuple(len(choice.encode("utf-8")) for choice in item.choices),
        where=item.where,
        greedy=tuple(greedy for _, greedy in scored),
    )


def _after_one_context(
    model: GPT, context: torch.Tensor, endings: list[torch.Tensor], batch_size: int
) -> list[tuple[float, bool]]:
    device = _device(model)
    caches = model.new_kv_caches(1)
    logits = model(context[None].to(device), caches, pos=0)  # (1, Tc, V)
    first = -F.log_softmax(logits[0, -1].float(), dim=-1)  # (V,): the loss of each choice's first token
    first_greedy = int(logits[0, -1].argmax())
    scored = []
    for start in range(0, len(endings), batch_size):
        chunk = endings[start : start + batch_size]
        width = max(e.numel() for e in chunk) - 1
        rest = torch.zeros(len(chunk), device=device)
        rest_greedy = torch.ones(len(chunk), dtype=torch.bool, device=device)
        if width > 0:
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            for row, ending in enumerate(chunk):
                inputs[row, : ending.numel() - 1] = ending[:-1]
                targets[row, : ending.numel() - 1] = ending[1:]
            rows = [cache.expand(len(chunk), context.numel()) for cache in caches]
            logits = model(inputs.to(device), rows, pos=context.numel())  # (n, width, V)
            rest = _token_losses(logits, targets.to(device)).sum(dim=1)  # (n,)
            rest_greedy = _greedy(logits, targets.to(device))
        for row, ending in enumerate(chunk):
            greedy = int(ending[0]) == first_greedy and bool(rest_greedy[row])
            scored.append(((first[int(ending[0])] + rest[row]).item(), greedy))
    return scored


def _as_whole_sequences(
    model: GPT, context: torch.Tensor, endings: list[torch.Tensor], batch_size: int
) -> list[tuple[float, bool]]:
    block_size = model.config.block_size
    scored: list[tuple[float, bool]] = []
    for start in range(0, len(endings), batch_size):
        chunk = endings[start : start + batch_size]
        sequences = [torch.cat([context, ending]) for ending in chunk]
        width = min(max(s.numel() for s in sequences) - 1, block_size)
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, (sequence, ending) in enumerate(zip(sequences, chunk, strict=True)):
            fed, predicted = sequence[:-1][-block_size:], sequence[1:][-block_size:]  # cropped on the left
            inputs[row, : fed.numel()] = fed
            targets[row, fed.numel() - ending.numel() : fed.numel()] = predicted[-ending.numel() :]
        logits = model(inputs.to(_device(model)))  # (n, width, V)
        targets = targets.to(logits.device)
        losses = _token_losses(logits, targets).sum(dim=1).tolist()
        scored += zip(losses, _greedy(logits, targets).tolist(), strict=True)
    return scored


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) cross-entropy in nats of each target under logits (B, T, V); 0 where the target is IGNORE."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return flat.view(targets.shape)


def _greedy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,): whether every target of a row (those that are not IGNORE) is the argmax of its logits (B, T, V)."""
    return ((logits.argmax(dim=-1) == targets) | (targets == IGNORE)).all(dim=1)


# -- generation ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationScore:
    prediction: str  # the generated text, up to its first stop string
    answer: str
    correct: bool  # normalized prediction == normalized answer
    where: str


def normalize_answer(text: str, ignore_case: bool = False) -> str:
    """What exact match compares: the text without surrounding whitespace, each run of whitespace inside it
    (spaces, tabs, line breaks) one space, and case kept unless `ignore_case` (then Unicode case-folded)."""
    collapsed = " ".join(text.split())
    return collapsed.casefold() if ignore_case else collapsed


def score_generations(
    model: GPT, tokenizer: Tokenizer, items: Sequence[GenerationItem], max_new_tokens: int = 32,
    ignore_case: bool = False,
) -> list[GenerationScore]:  # fmt: skip
    """Greedy generation for each item, one at a time (prompts of different lengths share no batch exactly),
    until its first stop string or `max_new_tokens` tokens, compared with its answer."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    scores = []
    with evaluating(model):
        for item in items:
            prompt = encode_text(tokenizer, item.prompt, f"{item.where}: the prompt")
            prediction = greedy_until(model, tokenizer, prompt, item.stop, max_new_tokens)
            correct = normalize_answer(prediction, ignore_case) == normalize_answer(item.answer, ignore_case)
            scores.append(GenerationScore(prediction, item.answer, correct, item.where))
    return scores


def greedy_until(
    model: GPT, tokenizer: Tokenizer, prompt: torch.Tensor, stop: Sequence[str], max_new_tokens: int
) -> str:
    """The greedy continuation of the token ids `prompt` (T,), cut before the first stop string it contains."""
    decoder = StreamDecoder(tokenizer)
    text = ""
    tokens = generate_tokens(model, prompt[None].to(_device(model)), max_new_tokens, temperature=0.0)
    with contextlib.closing(tokens):
        for token in tokens:
            text += decoder.push(token.tolist())
            if (cut := _first_stop(text, stop)) is not None:
                return text[:cut]
    text += decoder.flush()
    cut = _first_stop(text, stop)
    return text if cut is None else text[:cut]


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


# -- language modelling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: int  # the first token fed
    end: int  # one past the last token fed; the targets are tokens start + 1 .. end
    scored: int  # the last `scored` targets count: those no earlier window scored


def text_windows(num_tokens: int, block_size: int, stride: int | None = None) -> list[Window]:
    """Windows over a text of `num_tokens` tokens that score each token after the first exactly once.

    Each window is block_size tokens (fewer for a text shorter than that); each ends `stride` tokens after
    the one before, and the last ends at the text's end. A window scores its targets that no earlier window
    scored. stride block_size (the default): windows that do not overlap, the standard perplexity recipe (the
    last window overlaps the one before so that it is full); a token's context then grows from 0 to
    block_size - 1 across a window, as in validation. A smaller stride slides: every token after the first
    window sees at least block_size - stride tokens of context, at about block_size / stride times the cost.
    """
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be between 1 and the model's block_size {block_size}, got {stride}.")
    if num_tokens < 2:
        raise ValueError(f"the text is {num_tokens} token(s): language modelling needs two at least.")
    last = num_tokens - 1  # the last target
    windows, scored_to, end = [], 0, min(block_size, last)
    while True:
        windows.append(Window(max(0, end - block_size), end, end - scored_to))
        if end == last:
            return windows
        scored_to, end = end, min(end + stride, last)


@dataclass(frozen=True)
class WindowScore:
    bits: float  # the summed loss of the window's scored tokens, in bits
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the text they stand for
    chars: int  # characters of the text they stand for


def score_windows(
    model: GPT, tokenizer: Tokenizer, tokens: torch.Tensor, windows: Sequence[Window], batch_size: int = 8
) -> list[WindowScore]:
    """The bits of each window's scored tokens of `tokens` (N,), `batch_size` windows at a time."""
    bytes_per_token, chars_per_token = tokenizer.bytes_per_token(), tokenizer.characters_per_token()
    scores = []
    with evaluating(model):
        for first in range(0, len(windows), batch_size):
            chunk = windows[first : first + batch_size]
            width = max(w.end - w.start for w in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            for row, w in enumerate(chunk):
                length = w.end - w.start
                inputs[row, :length] = tokens[w.start : w.end]
                targets[row, length - w.scored : length] = tokens[w.end - w.scored + 1 : w.end + 1]
            logits = model(inputs.to(_device(model)))  # (n, width, V)
            bits = _token_losses(logits, targets.to(logits.device)).sum(dim=1) / math.log(2)  # (n,)
            for row, w in enumerate(chunk):
                scored = tokens[w.end - w.scored + 1 : w.end + 1].long()
                scores.append(WindowScore(bits[row].item(), w.scored, int(bytes_per_token[scored].sum().item()),
                                          int(chars_per_token[scored].sum().item())))  # fmt: skip
    return scores


def score_text(
    model: GPT, tokenizer: Tokenizer, text: str, batch_size: int = 8, stride: int | None = None,
    limit: int | None = None, where: str = "the text",
) -> list[WindowScore]:  # fmt: skip
    """The scores of the windows (the first `limit` of them, if given) over `text` (see `text_windows`)."""
    tokens = encode_text(tokenizer, text, where)
    windows = text_windows(tokens.numel(), model.config.block_size, stride)
    return score_windows(model, tokenizer, tokens, windows[:limit], batch_size)
