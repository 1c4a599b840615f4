"""From per-item results to scores: each with its item count, its standard error and the task's chance level.

Accuracies are means of 0/1 per item; their standard error is the sample one lm-eval reports,
sqrt(p (1 - p) / (n - 1)). Bits per byte and per character are ratios of sums over a text's windows; their
standard error treats the windows as a sample of the text (the delta method for a ratio), which ignores the
correlation between neighbouring windows. With fewer than two items there is no standard error (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gpt_lightning.evaluation.scoring import ChoiceScore, GenerationScore, WindowScore

# What each metric is, in the table's legend and the JSON: the one place that says which normalization is which.
DESCRIPTIONS = {
    "acc": "the right choice has the lowest summed loss of its tokens",
    "acc_norm": "the right choice has the lowest mean loss per token (build-nanogpt)",
    "acc_norm_bytes": "the right choice has the highest log-likelihood per UTF-8 byte of its text (lm-eval's "
    "acc_bytes; lm-eval's acc_norm divides by characters, the same for ASCII text)",
    "exact_match": "the greedy answer equals the answer, both with whitespace stripped and collapsed (case kept "
    "unless ignore_case)",
    "bits_per_byte": "summed loss in bits over the UTF-8 bytes of the text scored; chance: a uniform guess",
    "bits_per_char": "summed loss in bits over the characters of the text scored; chance: a uniform guess",
}


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    stderr: float | None  # None below two items
    n: int  # items (windows, for a text)
    chance: float | None  # what guessing scores: 1/choices on average, 0 for exact match, a uniform model's bits

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.name]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.description}


def mean_stderr(values: Sequence[float]) -> float | None:
    """The sample standard error of the mean (the n - 1 variance, as lm-eval): sqrt(p (1 - p) / (n - 1)) for 0/1."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _accuracy(name: str, hits: list[bool], chance: float) -> Metric:
    values = [float(hit) for hit in hits]
    return Metric(name, sum(values) / len(values), mean_stderr(values), len(values), chance)


def _argmin(values: Sequence[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)  # the first of equal values, as torch.argmin


def choice_metrics(scores: Sequence[ChoiceScore]) -> list[Metric]:
    """acc, acc_norm and acc_norm_bytes (DESCRIPTIONS) of multiple-choice results; chance: the mean of 1/choices."""
    _require(scores)
    chance = sum(1 / len(s.losses) for s in scores) / len(scores)
    per_token = [[loss / n for loss, n in zip(s.losses, s.tokens, strict=True)] for s in scores]
    per_byte = [[loss / n for loss, n in zip(s.losses, s.bytes, strict=True)] for s in scores]
    return [
        _accuracy("acc", [_argmin(s.losses) == s.label for s in scores], chance),
        _accuracy("acc_norm", [_argmin(t) == s.label for t, s in zip(per_token, scores, strict=True)], chance),
        _accuracy("acc_norm_bytes", [_argmin(b) == s.label for b, s in zip(per_byte, scores, strict=True)], chance),
    ]


def generation_metrics(scores: Sequence[GenerationScore]) -> list[Metric]:
    """exact_match of generation results; chance 0 (a guess matches a free-form answer by luck alone)."""
    _require(scores)
    return [_accuracy("exact_match", [s.correct for s in scores], 0.0)]


def text_metrics(scores: Sequence[WindowScore], vocab_size: int) -> list[Metric]:
    """bits_per_byte and bits_per_char of a text's windows; chance: those of a model that guesses uniformly
    over its vocabulary (log2(vocab_size) bits a token)."""
    _require(scores)
    bits = [s.bits for s in scores]
    tokens = sum(s.tokens for s in scores)
    metrics = []
    for name, sizes in (("bits_per_byte", [s.bytes for s in scores]), ("bits_per_char", [s.chars for s in scores])):
        value = sum(bits) / sum(sizes)
        chance = math.log2(vocab_size) * tokens / sum(sizes)
        metrics.append(Metric(name, value, _ratio_stderr(bits, sizes, value), len(scores), chance))
    return metrics


def _ratio_stderr(numerators: Sequence[float], denominators: Sequence[int], ratio: float) -> float | None:
    n = len(numerators)
    if n < 2:
        return None
    mean_denominator = sum(denominators) / n
    residuals = [a - ratio * b for a, b in zip(numerators, denominators, strict=True)]
    return math.sqrt(sum(r * r for r in residuals) / (n * (n - 1))) / mean_denominator


def _require(scores: Sequence[object]) -> None:
    if not scores:
        raise ValueError("no results to aggregate: the task has no items (or limit is 0).")
