"""Autoregressive sampling on token ids. Plain PyTorch: the model and the tokens, nothing else."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import torch

from gpt_lightning.model import GPT
from gpt_lightning.tokenizer import StreamDecoder, Tokenizer


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or unset to keep every token), got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}.")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws one token id per row from next-token logits (B, V); returns (B,).

    temperature 0 is greedy (argmax). top_k keeps the k most likely tokens (clamped to V); top_p keeps
    the smallest set of most likely tokens whose probability reaches p (nucleus sampling).
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p; the most likely always stays
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
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
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("the context must be a non-empty (batch, time) tensor of token ids: give a prompt.")
    check_sampling_args(temperature, top_k, top_p)
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


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """The text that continues `prompt`, piece by piece as it is sampled: never a split character (a BPE
    token can end inside one; the decoder holds it back until it is whole). Stops early when `cancelled()`
    says so, which is asked before each token. `generate` and `serve` both print through this."""
    device = next(model.parameters()).device
    idx = tokenizer.encode(prompt)[None].to(device)  # (1, T)
    decoder = StreamDecoder(tokenizer)
    tokens = generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_kv_cache)
    while not cancelled():
        token = next(tokens, None)
        if token is None:
            if text := decoder.flush():
                yield text
            return
        if text := decoder.push(token.tolist()):
            yield text
