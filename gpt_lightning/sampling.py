"""Autoregressive sampling on token ids. Plain PyTorch: the model and the tokens, nothing else."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Generator, Sequence
from typing import Any, Literal, NamedTuple

import torch

from gpt_lightning.model import GPT
from gpt_lightning.tokenizer import StreamDecoder, Tokenizer

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
FLOAT32 = torch.finfo(torch.float32)


class SamplingOptionError(ValueError):
    """A sampling option out of its range or of the wrong type; `option` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to sample, checked once when made: `generate`, `serve` and the TensorBoard sampler all take these.
    The defaults are `python main.py generate`'s (and a request's to `serve`)."""

    max_new_tokens: int = 500  # tokens to generate (characters, for a character model)
    temperature: float = 0.8  # below 1 is more conservative; 0 is greedy (argmax)
    top_k: int | None = None  # sample from the k most likely tokens only (clamped to the vocabulary); None: all
    top_p: float | None = None  # nucleus sampling: the smallest set of tokens whose probability reaches p
    seed: int = 1337  # the same seed gives the same text

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, ">= 0", lambda n: n >= 0)
        temperature = _number("temperature", self.temperature, "0 is greedy, 1 samples the model as it is")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise SamplingOptionError("temperature", f"temperature must be >= 0 and finite (0 is greedy), got "
                                                     f"{_shown(self.temperature)}.")  # fmt: skip
        object.__setattr__(self, "temperature", temperature)  # 1 and 1.0 sample alike
        if self.top_k is not None:
            _check_int("top_k", self.top_k, ">= 1", lambda k: k >= 1, " (or null to keep every token)")
        if self.top_p is not None:
            top_p = _number("top_p", self.top_p, "or null to keep every token")
            if not 0.0 < top_p <= 1.0:  # NaN fails this too
                raise SamplingOptionError("top_p", f"top_p must be in (0, 1] (1, or null, keeps every token), got "
                                                   f"{_shown(self.top_p)}.")  # fmt: skip
            object.__setattr__(self, "top_p", top_p)
        _check_int("seed", self.seed, "from 0 to 2**64 - 1", lambda s: 0 <= s <= MAX_SEED)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed`: the sampler draws from it on any device (see `sample_next`)."""
        return torch.Generator().manual_seed(self.seed)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."  # an int of 400 digits is still one short line


def _number(option: str, value: Any, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingOptionError(option, f"{option} must be a number ({hint}), got {_shown(value)} "
                                          f"({type(value).__name__}).")  # fmt: skip
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        return math.inf


def _check_int(option: str, value: Any, bounds: str, within: Callable[[int], bool], hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingOptionError(option, f"{option} must be an integer {bounds}{hint}, got {_shown(value)} "
                                          f"({type(value).__name__}).")  # fmt: skip
    if not within(value):
        raise SamplingOptionError(option, f"{option} must be {bounds}{hint}, got {_shown(value)}.")


DEFAULT_SAMPLING = SamplingOptions()  # for signatures that show the defaults in --help


def check_prompt(tokenizer: Tokenizer, prompt: str, what: str = "the prompt") -> None:
    """Raises a one-line ValueError unless `tokenizer` can encode `prompt`: whole characters (a lone surrogate,
    half of a UTF-16 pair, is valid JSON and what argv makes of a byte that is not UTF-8, but no text), and, for
    a character model, only characters of its vocabulary."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} has a lone surrogate {prompt[err.start]!r} at character {err.start}, half of a "
                         "UTF-16 pair and no character: send whole characters (valid UTF-8).") from None  # fmt: skip
    tokenizer.check(prompt, what=what)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws one token id per row from next-token logits (B, V); returns (B,).

    temperature 0 is greedy (argmax). top_k keeps the k most likely tokens (clamped to V); top_p keeps
    the smallest set of most likely tokens whose probability reaches p (nucleus sampling). This runs once per
    token, so it checks nothing: the options are checked once, by `SamplingOptions`.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Scaled after subtracting the largest logit: every value is then <= 0 and the largest exactly 0, so no
    # temperature, however small or large, gives inf or NaN (1e-40 did). The limits are greedy and uniform.
    scale = min(max(temperature, FLOAT32.tiny), FLOAT32.max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / scale
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the ones before it already reach top_p
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop_sorted[:, 0] = False  # the most likely always stays, however small top_p (1e-300 is 0 in float32)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    # Sample on the CPU from a CPU generator: the same seed then gives the same text on any device.
    return torch.multinomial(probs.cpu(), num_samples=1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
) -> Generator[torch.Tensor, None, None]:
    """Yields `max_new_tokens` new token ids (B,) one at a time, continuing the context idx (B, T).

    The model sees at most its block_size last tokens. With the KV cache, each step feeds only the new
    token; once the text outgrows block_size the window slides, and since positions are absolute the
    cache is rebuilt from the cropped window, exactly as a run without the cache would see it.
    """
    SamplingOptions(max_new_tokens, temperature, top_k, top_p)  # checked once here, never per token
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("the context must be a non-empty (batch, time) tensor of token ids: give a prompt.")
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        caches = model.new_kv_caches(idx.size(0)) if use_kv_cache else None
        cached = 0  # tokens of the current window already in the cache
        for _ in range(max_new_tokens):
            window = idx[:, -block_size:]  # (B, <=block_size)
            if caches is None:
                logits = model(window)
            elif cached and idx.size(1) <= block_size:
                logits = model(window[:, cached:], caches, pos=cached)
            else:  # first step, or the window slid past block_size: prefill from position 0
                logits = model(window, caches, pos=0)
            cached = window.size(1)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            yield next_id
    finally:
        model.train(was_training)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs: object) -> torch.Tensor:
    """The context idx (B, T) followed by max_new_tokens sampled ids: (B, T + max_new_tokens)."""
    new = list(generate_tokens(model, idx, max_new_tokens, **kwargs))  # type: ignore[arg-type]
    return torch.cat([idx, *(t[:, None] for t in new)], dim=1) if new else idx


class StreamEnd(NamedTuple):
    """How `stream_text` ended, its return value: before a stop string ("stop"), after max_new_tokens ("length")
    or cancelled; with the tokens of the prompt and the tokens sampled."""

    reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    tokens: int


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    options: SamplingOptions,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
    cancelled: Callable[[], bool] = lambda: False,
    stop: Sequence[str] = (),
) -> Generator[str, None, StreamEnd]:
    """The text that continues `prompt`, piece by piece as it is sampled: never a split character (a BPE
    token can end inside one; the decoder holds it back until it is whole). Stops early when `cancelled()`
    says so, which is asked before each token, and before the first of the `stop` strings (a fine-tune's end
    marker), which is never yielded: text that may begin one is held back until it is known not to. The
    generator is seeded from `options` unless one is given (to draw several samples in a row). It returns how it
    ended (`StreamEnd`). `generate`, `serve` and the TensorBoard sampler all print through this."""
    device = next(model.parameters()).device
    idx = tokenizer.encode(prompt)[None].to(device)  # (1, T)
    decoder = StreamDecoder(tokenizer)
    tokens = generate_tokens(model, idx, options.max_new_tokens, options.temperature, options.top_k, options.top_p,
                             options.generator() if generator is None else generator, use_kv_cache)  # fmt: skip
    held = ""  # decoded, not yet yielded: it may be the start of a stop string
    sampled = 0
    with contextlib.closing(tokens):
        while not cancelled():
            token = next(tokens, None)
            sampled += token is not None
            held += decoder.flush() if token is None else decoder.push(token.tolist())
            cut = min((i for i in (held.find(s) for s in stop) if i >= 0), default=None)
            if cut is not None or token is None:
                if text := held[:cut]:
                    yield text
                return StreamEnd("length" if cut is None else "stop", idx.size(1), sampled)
            keep = max((k for s in stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
            if text := held[: len(held) - keep]:
                yield text
                held = held[len(text) :]
    return StreamEnd("cancelled", idx.size(1), sampled)
