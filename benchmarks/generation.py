"""Generation speed with and without the KV cache, side by side in one run, on untrained weights of a recipe's
network (speed does not depend on what the weights say).

    python -m benchmarks.generation --preset cpu baby-gpt --max-new-tokens 500 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import RECIPES, recipe_model
from gpt_lightning.commands.device import synchronize
from gpt_lightning.model import GPT
from gpt_lightning.sampling import generate


def tokens_per_second(model: GPT, max_new_tokens: int, use_kv_cache: bool, device: torch.device) -> float:
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(0)
    synchronize(device)
    start = time.perf_counter()
    generate(model, idx, max_new_tokens, generator=generator, use_kv_cache=use_kv_cache)
    synchronize(device)
    return max_new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(RECIPES), default=["cpu", "baby-gpt"])
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved (cache, no cache) rounds; medians")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={args.device} threads={args.threads} max_new_tokens={args.max_new_tokens} rounds={args.rounds}")
    print(f"{'preset':>10}  {'block':>5}  {'cache tok/s':>11}  {'no-cache tok/s':>14}  {'speed-up':>8}")
    for name in args.preset:
        torch.manual_seed(0)
        config = recipe_model(name)
        model = GPT(config).to(device).eval()
        tokens_per_second(model, 10, True, device)  # warm-up
        cached, uncached = [], []
        for _ in range(args.rounds):
            cached.append(tokens_per_second(model, args.max_new_tokens, True, device))
            uncached.append(tokens_per_second(model, args.max_new_tokens, False, device))
        with_cache, without = statistics.median(cached), statistics.median(uncached)
        speed_up = with_cache / without
        print(f"{name:>10}  {config.block_size:>5}  {with_cache:>11,.0f}  {without:>14,.0f}  {speed_up:>7.2f}x")


if __name__ == "__main__":
    main()
