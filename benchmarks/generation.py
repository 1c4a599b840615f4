"""Generation speed with and without the KV cache, side by side in one run, on untrained weights of a preset
(speed does not depend on what the weights say).

    python benchmarks/generation.py --preset cpu baby-gpt --max-new-tokens 500 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_lightning.generate import generate  # noqa: E402
from gpt_lightning.model import GPT, PRESETS  # noqa: E402


def tokens_per_second(model: GPT, max_new_tokens: int, use_kv_cache: bool, device: torch.device) -> float:
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, idx, max_new_tokens, generator=generator, use_kv_cache=use_kv_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return max_new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["cpu", "baby-gpt"])
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
        model = GPT(PRESETS[name]).to(device).eval()
        tokens_per_second(model, 10, True, device)  # warm-up
        cached, uncached = [], []
        for _ in range(args.rounds):
            cached.append(tokens_per_second(model, args.max_new_tokens, True, device))
            uncached.append(tokens_per_second(model, args.max_new_tokens, False, device))
        with_cache, without = statistics.median(cached), statistics.median(uncached)
        block = PRESETS[name].block_size
        print(f"{name:>10}  {block:>5}  {with_cache:>11,.0f}  {without:>14,.0f}  {with_cache / without:>7.2f}x")


if __name__ == "__main__":
    main()
