"""GPT-2 on this machine, for the record: what the BPE token cache and a GPT-2-small training step cost on a
CPU, full fine-tuning against LoRA, and the memory each GPT-2 size needs on a GPU.

    python -m benchmarks.gpt2_cpu --data-dir D                      # all three parts
    python -m benchmarks.gpt2_cpu --data-dir D --tokenizer gpt2     # GPT-2's own BPE (needs its tokenizer.json)

1. Encoding: the token cache of the corpus repeated `--copies` times, built with the character vocabulary
   and with a byte-level BPE (`--tokenizer`: a tokenizer.json, or `gpt2`; unset, one trained here on the
   corpus with GPT-2's settings and up to 50,257 tokens, as GPT-2's tokenizer cannot be downloaded here).
   The BPE three ways, each segment between two cuts encoded: one per call; in batches by the library's
   threads with every token's offsets tracked (`encode_batch`, the cache's path until 2026-12-04); in
   batches of ids alone (`encode_batch_fast`, the cache's path now). MB/s of text, the median of
   `--repeats` builds into fresh folders, the builds of all rows taken in turn so that the machine's load
   falls on each alike.
2. One training step of the GPT-2-small shape with GPT-2's 50,257-token vocabulary (124M parameters),
   context 1024, batch 1, AdamW, float32: full fine-tuning against LoRA rank 8 (attention's qkv and output
   projections). Each runs in a fresh process, so its peak resident memory (ru_maxrss) is its own.
3. The GPU memory of full fine-tuning against LoRA rank 8 for each GPT-2 size: weights, gradients and
   AdamW state computed from the parameter counts (float32 master weights, as under bf16-mixed), and an
   estimate of the activations of a batch of 8 x 1024 tokens (Korthikanti et al., 2022).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import fresh_process_output, trained_bpe
from gpt_lightning.commands.device import synchronize
from gpt_lightning.data.corpus import corpus_path
from gpt_lightning.data.token_cache import TokenCache, build_token_cache
from gpt_lightning.lora import LoRAConfig, add_lora
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.tokenizer import BPETokenizer, tokenizer_from_spec

GPT2_SIZES = {  # n_layer, n_head, n_embd: OpenAI's four GPT-2 models
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
VOCAB = 50_257


def gpt2_config(name: str) -> GPTConfig:
    n_layer, n_head, n_embd = GPT2_SIZES[name]
    return GPTConfig(vocab_size=VOCAB, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=True,
                     gelu="tanh")  # fmt: skip


class OneSegmentPerCall(BPETokenizer):
    """The BPE token cache's path without batches: the library's `encode`, one segment at a time."""

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids) for text in texts]


class BatchesWithOffsets(BPETokenizer):
    """The BPE token cache's path until 2026-12-04: batches through the library's `encode_batch`, which also
    tracks where each token lies in the text (offsets the cache never reads)."""

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


def encoding(args: argparse.Namespace) -> None:
    text = corpus_path(args.data_dir).read_text(encoding="utf-8")
    bpe = tokenizer_from_spec(args.tokenizer) if args.tokenizer else trained_bpe(corpus_path(args.data_dir), VOCAB)
    assert bpe is not None
    rows: dict[str, BPETokenizer | None] = {
        "characters": None,
        "BPE, one segment per call": OneSegmentPerCall(bpe.tokenizer_json),
        "BPE, batches with offsets (before)": BatchesWithOffsets(bpe.tokenizer_json),
        "BPE, batches of ids alone (now)": bpe,
    }
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "corpus.txt"
        big.write_text("\n\n".join([text] * args.copies), encoding="utf-8")
        megabytes = big.stat().st_size / 1e6
        times: dict[str, list[float]] = {name: [] for name in rows}
        caches: dict[str, TokenCache] = {}
        for i in range(args.repeats):
            for j, (name, tokenizer) in enumerate(rows.items()):
                folder = Path(tmp) / f"cache-{j}-{i}"
                start = time.perf_counter()
                caches[name] = build_token_cache(big, folder, bpe=tokenizer)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(folder)
        digests = {caches[name].tokens_blake2b for name, tokenizer in rows.items() if tokenizer is not None}
        assert len(digests) == 1, "the BPE paths wrote different ids"
        threads = os.environ.get("RAYON_NUM_THREADS", "one per core")
        print(f"\n{megabytes:.1f} MB of text ({args.copies} copies of the corpus), {args.repeats} builds each, "
              f"median; {len(os.sched_getaffinity(0))} cores, the library's threads: {threads}:\n")  # fmt: skip
        print("| tokenizer | vocabulary | tokens | MB/s | against before |")
        print("|---|---|---|---|---|")
        before = megabytes / statistics.median(times["BPE, batches with offsets (before)"])
        for name, tokenizer in rows.items():
            size = len(set(text)) if tokenizer is None else tokenizer.vocab_size
            rate = megabytes / statistics.median(times[name])
            print(f"| {name} | {size:,} | {caches[name].num_tokens:,} | {rate:.1f} | {rate / before:.2f}x |")


def one_step(method: str, steps: int) -> dict[str, float]:
    """Run in a fresh process: its peak resident memory is then this method's alone."""
    result = train_steps(gpt2_config("gpt2"), method, steps)
    return {**result, "peak RSS": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def train_steps(
    config: GPTConfig,
    method: str,
    steps: int,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    compile: str = "false",
) -> dict[str, float]:
    """`steps` training steps of `config` on random token ids (full fine-tuning, or LoRA rank 8): AdamW, under
    autocast to `dtype` where given, the forward compiled as `model.compile` does (false, true or one of
    torch's modes). The median seconds per step (after one untimed step), trainable parameters, AdamW's state
    in bytes and the training FLOPs of a token."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if method == "lora":
        add_lora(model, LoRAConfig(rank=8, dropout=0.0))
    forward = model.forward
    if compile != "false":
        forward = torch.compile(model.forward, mode=None if compile == "true" else compile)
    optimizer = torch.optim.AdamW(model.parameter_groups(0.1), lr=1e-4, fused=device == "cuda")
    x = torch.randint(config.vocab_size, (batch_size, config.block_size), device=device)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype is not None)
    times = []
    for _ in range(steps + 1):  # the first step allocates AdamW's state and warms the allocator: untimed
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            logits = forward(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x.roll(-1, dims=1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))  # fmt: skip
    return {
        "s/step": statistics.median(times[1:]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer bytes": state,
        "flops/token": model.flops_per_token(),
    }


def steps_table(args: argparse.Namespace) -> None:
    print(f"\nGPT-2 small shape (124M, vocabulary {VOCAB:,}), context 1024, batch 1, AdamW, float32, "
          f"{torch.get_num_threads()} threads; median of {args.steps} steps after one untimed:\n")  # fmt: skip
    print("| fine-tuning | trainable parameters | AdamW state | s/step | tokens/s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for method in ("full", "lora"):
        one_step = ("--one-step", method, "--steps", str(args.steps), "--threads", str(torch.get_num_threads()))
        result = json.loads(fresh_process_output("benchmarks.gpt2_cpu", *one_step))
        label = "full" if method == "full" else "LoRA rank 8"
        print(
            f"| {label} | {result['trainable']:,} | {result['optimizer bytes'] / 1e6:,.1f} MB | "
            f"{result['s/step']:.2f} | {1024 / result['s/step']:,.0f} | {result['peak RSS'] / 1e9:.2f} GB |"
        )


def activation_bytes(config: GPTConfig, batch: int, context: int) -> float:
    """An estimate of a training step's activations under bf16-mixed: 34 bytes per token and width in each
    block (Korthikanti et al., 2022, without the attention scores, which PyTorch's fused attention does not
    keep), plus the logits (bf16) and the loss's float32 softmax over the vocabulary."""
    tokens = batch * context
    return 34 * tokens * config.n_embd * config.n_layer + 6 * tokens * config.vocab_size


def step_memory_bytes(name: str, batch: int, context: int, lora: LoRAConfig | None = None) -> float:
    """A training step's GPU memory, computed: float32 weights, gradients and AdamW state (16 bytes per trained
    parameter, 4 per frozen one) plus `activation_bytes`. The card presets (configs/gpu/) are sized by it."""
    with torch.device("meta"):
        model = GPT(gpt2_config(name))
        if lora is not None and lora.enabled:
            add_lora(model, lora)
    weights = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * weights + 12 * trainable + activation_bytes(model.config, batch, context)


def memory_table(batch: int = 8, context: int = 1024) -> None:
    print("\nGPU memory of full fine-tuning against LoRA rank 8 (qkv and output projections): float32 weights, "
          "gradients and AdamW state (16 bytes per trained parameter, 4 per frozen one), plus an estimate of the "
          f"activations of a batch of {batch} x {context} tokens (the same for both: the backward pass still runs "
          "through every frozen block):\n")  # fmt: skip
    print("| model | parameters | activations | full fine-tuning | LoRA rank 8 (trainable) | fits 24 GB: full | LoRA |")
    print("|---|---|---|---|---|---|---|")
    fits = {True: "yes", False: "no"}
    for name in GPT2_SIZES:
        with torch.device("meta"):
            model = GPT(gpt2_config(name))
            total = model.num_parameters()
            add_lora(model, LoRAConfig(rank=8))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        activations = activation_bytes(model.config, batch, context)
        full = step_memory_bytes(name, batch, context)
        lora = step_memory_bytes(name, batch, context, LoRAConfig(rank=8))
        row = [name, f"{total / 1e6:,.1f}M", f"{activations / 1e9:.1f} GB", f"{full / 1e9:.1f} GB",
               f"{lora / 1e9:.1f} GB ({trainable / 1e6:.2f}M)", fits[full < 24e9], fits[lora < 24e9]]  # fmt: skip
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--tokenizer", help="a tokenizer.json, or gpt2 (unset: a BPE trained on the corpus)")
    parser.add_argument("--copies", type=int, default=10, help="times the corpus is repeated for the encoding")
    parser.add_argument("--repeats", type=int, default=3, help="builds per tokenizer")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per method")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 cores here)")
    parser.add_argument(
        "--parts", nargs="+", choices=["encode", "step", "memory"], default=["encode", "step", "memory"]
    )
    parser.add_argument("--one-step", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_step:
        print(json.dumps(one_step(args.one_step, args.steps)))
        return
    if "encode" in args.parts:
        encoding(args)
    if "step" in args.parts:
        steps_table(args)
    if "memory" in args.parts:
        memory_table()


if __name__ == "__main__":
    main()
