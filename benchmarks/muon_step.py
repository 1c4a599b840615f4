"""The cost of a training step with AdamW, Muon in bfloat16 (torch.optim.Muon's own) and Muon in float32
(ours), on a recipe's model and batches (`--preset`, the CPU recipe's unless told), and the optimizer step
alone.

The three take turns of `--steps` steps, round after round, so that the drift of a shared machine
cancels; the table gives the median over the rounds, in ms per step. Each variant keeps its own model
and optimizer; the batches are random tokens (the cost does not depend on their values).

    python -m benchmarks.muon_step
    ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.muon_step   # as on a CPU without native bfloat16
    python -m benchmarks.muon_step --device cuda --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --batch-size 64

`ONEDNN_MAX_CPU_ISA=AVX2` caps oneDNN below its bfloat16 kernels, so a CPU with AVX-512 BF16 or AMX
multiplies bfloat16 matrices as an AVX2 laptop does, through PyTorch's slow fallback.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from benchmarks.common import RECIPES, recipe_files, recipe_model, recipe_settings
from gpt_lightning.commands.device import synchronize
from gpt_lightning.optim import native_bf16
from gpt_lightning.training.module import GPTModule

VARIANTS = {"AdamW": {"optimizer": "adamw"}, "Muon bf16": {"optimizer": "muon", "muon_precision": "bf16"},
            "Muon fp32": {"optimizer": "muon", "muon_precision": "fp32"}}  # fmt: skip


def build(variant: dict, args: argparse.Namespace) -> tuple[GPTModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    vocab = "".join(map(chr, range(32, 97)))  # 65 symbols, as tiny Shakespeare's
    module = GPTModule(vocab=vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, **variant)  # fmt: skip
    module._trainer = SimpleNamespace(max_steps=10_000, precision_plugin=SimpleNamespace(scaler=None))  # type: ignore[assignment]
    module.to(args.device)
    return module, module.configure_optimizers()["optimizer"]


def turn(
    module: GPTModule, optimizer: torch.optim.Optimizer, steps: int, args: argparse.Namespace
) -> tuple[float, float]:
    """(ms per training step, ms per optimizer step) over `steps` steps."""
    total = optimizer_s = 0.0
    for _ in range(steps):
        x = torch.randint(65, (args.batch_size, args.block_size), device=args.device)
        synchronize(args.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        module._loss((x, x.roll(-1, dims=1))).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        synchronize(args.device)
        before_step = time.perf_counter()
        optimizer.step()
        synchronize(args.device)
        end = time.perf_counter()
        total += end - start
        optimizer_s += end - before_step
    return total / steps * 1e3, optimizer_s / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 weights; TF32 is not turned on)")
    parser.add_argument("--preset", choices=sorted(RECIPES), default="cpu", help="recipe whose model and batch to use")
    parser.add_argument("--n-layer", type=int, help="override the recipe's")
    parser.add_argument("--n-head", type=int, help="override the recipe's")
    parser.add_argument("--n-embd", type=int, help="override the recipe's")
    parser.add_argument("--block-size", type=int, help="override the recipe's context")
    parser.add_argument("--batch-size", type=int, help="override the recipe's")
    args = parser.parse_args()
    model = recipe_model(args.preset)
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        setattr(args, name, getattr(args, name) or getattr(model, name))
    args.batch_size = args.batch_size or recipe_settings(recipe_files(args.preset))["data"]["batch_size"]
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    bf16 = native_bf16(torch.device(args.device))
    print(f"torch {torch.__version__}, {device}, native bfloat16: {bf16}; model {args.n_layer}x{args.n_embd}, "
          f"context {args.block_size}, batch {args.batch_size}")  # fmt: skip
    built = {name: build(variant, args) for name, variant in VARIANTS.items()}
    for module, optimizer in built.values():
        turn(module, optimizer, 2, args)  # warm-up: allocator, kernels, lazy state
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (module, optimizer) in built.items():
            times[name].append(turn(module, optimizer, args.steps, args))
    adamw = statistics.median(t for t, _ in times["AdamW"])
    print("\n| optimizer | ms per training step | ms per optimizer step | training step vs AdamW |")
    print("|---|---|---|---|")
    for name, rounds in times.items():
        step = statistics.median(t for t, _ in rounds)
        optimizer_ms = statistics.median(o for _, o in rounds)
        print(f"| {name} | {step:.1f} | {optimizer_ms:.1f} | {step / adamw:.2f}x |")


if __name__ == "__main__":
    main()
