"""A decoder-only transformer language model, GPT-2 style, in plain PyTorch.

Read top to bottom: the config, then the pieces from small to large (attention, MLP, block) and
finally `GPT`, which stacks them. Nothing here knows about Lightning; `lit_model.py` wraps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 65  # the tokens it predicts: tiny Shakespeare's 65 characters; set from the tokenizer
    padded_vocab_size: int | None = None  # rows of the embedding and head, for a round matmul shape; None: vocab_size
    block_size: int = 256  # the longest context the model sees: the size of the position table
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block; must divide n_embd
    n_embd: int = 384  # width of the residual stream
    dropout: float = 0.0  # the baby GPT overfits 1M characters without it; large corpora want 0
    bias: bool = False  # biases in Linear and LayerNorm: GPT-2 had them, without is a bit better and faster
    gelu: str = "exact"  # "tanh": the approximation OpenAI's GPT-2 was trained with; its weights need it
    tie_embeddings: bool = True  # the head is the token embedding (GPT-2); False: a matrix of its own

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}.")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"GPTConfig.padded_vocab_size ({self.padded_vocab_size}) is less than vocab_size ({self.vocab_size}): "
                f"every token needs a row of the embedding. Use {self.vocab_size} or more, or None (no padding)."
            )
        if self.n_embd % self.n_head != 0:
            lower = self.n_embd - self.n_embd % self.n_head
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) so every head gets "
                f"the same width: use n_embd {lower or self.n_head} or {lower + self.n_head}, or another n_head."
            )
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu must be exact or tanh (GPT-2's approximation), got {self.gelu!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}: 0 disables it, 0.2 is typical.")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def vocab_rows(self) -> int:
        """Rows of the token embedding (and head): the vocabulary and its padding."""
        return self.padded_vocab_size or self.vocab_size


# Named shapes. vocab_size is tiny Shakespeare's; the tokenizer of a run overrides it.
PRESETS: dict[str, GPTConfig] = {
    # nanoGPT's CPU recipe for shakespeare-char: trains in minutes on a laptop, about 0.8M parameters
    "cpu": GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128),
    # nanoGPT's shakespeare-char "baby GPT" for one GPU: about 10.7M parameters
    "baby-gpt": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # GPT-2 small's stack (124M with its 50,257 tokens) over 65 characters: about 85.9M parameters
    "gpt2-small": GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True),
}


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer, so that decoding a new token
    costs one token's worth of work instead of re-running the whole context."""

    def __init__(
        self, batch_size: int, n_head: int, max_len: int, head_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (B, nh, T, hs) at positions pos..pos+T and returns everything up to there."""
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def expand(self, batch_size: int, length: int) -> KVCache:
        """A new cache whose `batch_size` rows each start with this one-row cache's first `length` positions:
        several continuations of one prefix then run as a batch after a single pass over the prefix."""
        _, n_head, max_len, head_size = self.k.shape
        rows = KVCache(batch_size, n_head, max_len, head_size, self.k.device, self.k.dtype)
        rows.k[:, :, :length] = self.k[:, :, :length]
        rows.v[:, :, :length] = self.v[:, :, :length]
        return rows


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, pos)  # (B, nh, pos + T, hs)

        # Queries at pos..pos+T see keys 0..their own position. From position 0 that is the usual
        # causal mask; one new token sees every cached key; a chunk after a prefix needs an offset mask.
        # A packed batch brings its own mask (packed_attention), causal within each example.
        if mask is None and pos > 0 and T > 1:
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,  # without a mask to read, the fused causal kernel
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: normalise, then add each sub-layer's output to the residual stream."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def packed_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask for rows that each pack several examples, given as runs of equal ids in
    segments (B, T). Each token's position counts from the start of its run, and it may attend only to earlier
    tokens of its own run: a packed example reads exactly as it would alone, and no example sees another."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # (B, T) the first token of each run
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values  # (B, T) minus where its run starts
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T) query and key in one run
    return positions, same.tril()[:, None]  # (B, 1, T, T): causal within the run, one mask for all heads


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_rows, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_rows, bias=False)
        if config.tie_embeddings:
            # Weight tying: reading a token in and predicting it out share one matrix (Press & Wolf, 2017).
            self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream, so scale them down to keep
        # the stream's variance independent of depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        caches: list[KVCache] | None = None,
        pos: int = 0,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns next-token logits (B, T, vocab_size) for token ids idx (B, T) at positions pos..pos+T.

        With `caches` (one per block, from `new_kv_caches`), keys and values of earlier calls are reused,
        so incremental decoding passes only the new tokens. With `segments` (B, T), each row packs several
        examples, as runs of equal ids (instruct.pack): each is read as if alone (`packed_attention`).
        """
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(
                f"cannot run a sequence of length {pos + T} through a model with block_size "
                f"{self.config.block_size}: crop the context to its last {self.config.block_size} tokens."
            )
        mask = None
        if segments is None:
            positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)  # (T,)
        elif caches is None and pos == 0:
            positions, mask = packed_attention(segments)  # (B, T), (B, 1, T, T): built once, shared by every block
        else:
            raise ValueError("segments are for packed batches of whole examples: decode without them.")
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[i], pos, mask)
        x = self.ln_f(x)
        # The head runs over every row, padding included: a round shape is faster on GPUs (nanoGPT pads GPT-2's
        # 50,257 to 50,304), and under torch.compile the slice fuses into the loss. The padding never reaches a
        # softmax, so it gets no gradient and is never sampled.
        return self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, vocab_size)

    def new_kv_caches(self, batch_size: int) -> list[KVCache]:
        """Empty caches, one per block, sized for a full context and matching the model's device and dtype."""
        c, weight = self.config, self.lm_head.weight
        return [
            KVCache(batch_size, c.n_head, c.block_size, c.head_size, weight.device, weight.dtype)
            for _ in range(c.n_layer)
        ]

    @torch.no_grad()
    def grow_vocab(self, known: int, tokens: int) -> None:
        """Gives ids `known`..`tokens - 1`, which a tokenizer appended to the vocabulary, rows of their own (in
        place): they take the vocabulary's padding rows, if any, and the token embedding (and an untied head)
        grow to `tokens` rows if they have fewer; each new id's rows start as the mean of the `known` ids' rows.
        Every other row keeps its value, so every old id keeps its meaning. A new token starts as an average
        token: its logit is the mean of the old tokens' logits, never an outlier, so its probability is at most
        the old tokens' average (Jensen): k new tokens beside n old ones raise the loss on old text by at most
        ln(1 + k/n), 0.14 nats for 10 beside 65 (Hewitt, 2021, "Initializing new word embeddings for pretrained
        language models"; Hugging Face's resize_token_embeddings draws the rows close to the same mean). The new
        rows are alike at first; the targets that name each token tell them apart as they train."""
        vocab_size = max(self.config.vocab_size, tokens)  # new ids take padding rows first, if there are any

        def grown(weight: torch.Tensor) -> torch.Tensor:  # (rows, C), the new ids' rows the mean of the known
            weight[known:tokens] = weight[:known].float().mean(0).to(weight.dtype)
            return weight

        self._resize_vocab(vocab_size, max(self.config.vocab_rows, vocab_size), grown)

    @torch.no_grad()
    def pad_vocab(self, rows: int) -> None:
        """Gives the token embedding (and an untied head) `rows` rows in place, at least the vocabulary's: padding
        rows are added as zeros or dropped, and the vocabulary's own rows keep their values."""
        self._resize_vocab(self.config.vocab_size, rows, lambda weight: weight)

    def _resize_vocab(self, vocab_size: int, rows: int, fill: Callable[[torch.Tensor], torch.Tensor]) -> None:
        config = replace(self.config, vocab_size=vocab_size, padded_vocab_size=rows if rows > vocab_size else None)

        def resized(weight: torch.Tensor) -> nn.Parameter:  # (old rows, C) -> (rows, C)
            kept = weight[:rows]
            return nn.Parameter(fill(torch.cat([kept, kept.new_zeros(rows - len(kept), weight.shape[1])])))

        self.wte.weight = resized(self.wte.weight)
        self.lm_head.weight = self.wte.weight if config.tie_embeddings else resized(self.lm_head.weight)
        self.wte.num_embeddings = self.lm_head.out_features = rows
        self.config = config

    def padding_parameters(self) -> int:
        """Parameters in the padding rows of the token embedding (and of an untied head): computed, never trained."""
        c = self.config
        return (c.vocab_rows - c.vocab_size) * c.n_embd * (1 if c.tie_embeddings else 2)

    def padding_summary(self) -> str | None:
        """The padding rows past the tokens and their parameters, in one line; None for an unpadded vocabulary.
        (Lightning's model summary counts the padding; our counts leave it out.)"""
        c = self.config
        if not c.padded_vocab_size:
            return None
        return (f"model.vocab_size {c.vocab_rows}: {c.vocab_rows - c.vocab_size} padding rows past the "
                f"{c.vocab_size} tokens ({self.padding_parameters():,} parameters, never trained)")  # fmt: skip

    def num_parameters(self, exclude_position_embedding: bool = False) -> int:
        """Parameters the model trains, each counted once (a tied head is the token embedding): the padding rows
        of the vocabulary are not among them."""
        n = sum(p.numel() for p in self.parameters()) - self.padding_parameters()
        return n - self.wpe.weight.numel() if exclude_position_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward): 6N for the weight matmuls plus 12·L·C·T for
        attention scores and their weighted sum (PaLM appendix B; N excludes the position table, and an
        untied token embedding, which are lookups, and the vocabulary's padding rows, which compute nothing
        used). Of the 6, 2 are the weight gradient, which a frozen weight (LoRA's base) skips."""
        c = self.config
        # A tied embedding is the head's matmul; it is listed once, as wte.weight.
        lookups = ("wpe.weight",) if c.tie_embeddings else ("wpe.weight", "wte.weight")
        matmul = [(name, p) for name, p in self.named_parameters() if name not in lookups]
        padding = {name: (c.vocab_rows - c.vocab_size) * c.n_embd for name in ("wte.weight", "lm_head.weight")}
        counts = [(p.numel() - padding.get(name, 0), p.requires_grad) for name, p in matmul]
        frozen = sum(n for n, trains in counts if not trains)
        return 6 * sum(n for n, _ in counts) - 2 * frozen + 12 * c.n_layer * c.n_embd * c.block_size

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matrices (matmul weights, embeddings); leave biases and norm gains alone.
        Chosen by the layer that owns them, not by their shape, which FSDP flattens into shards. Frozen
        parameters (LoRA's base weights) are left out."""
        matrices = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear | nn.Embedding)}
        params = [p for p in self.parameters() if p.requires_grad]  # unique (the tied head appears once), unfrozen
        return [
            {"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0},
        ]


CompileMode = Literal["reduce-overhead", "max-autotune"]  # torch.compile's modes besides its default


def compiled_forward(gpt: GPT, compile: bool | CompileMode) -> Callable[..., torch.Tensor] | None:
    """`gpt.forward` through torch.compile (true: torch's default mode, or a mode), None for false. A function,
    not a module: no second copy of the weights' names in the state_dict, and sampling (whose every token is a
    new shape) runs the plain network."""
    if compile not in (False, True, *get_args(CompileMode)):
        raise ValueError(f"model.compile must be true, false or a mode ({', '.join(get_args(CompileMode))}), "
                         f"got {compile!r}.")  # fmt: skip
    return None if compile is False else torch.compile(gpt.forward, mode=None if compile is True else compile)
