"""Items per second of `evaluate` on a multiple-choice task, on untrained weights of a recipe's network (speed does
not depend on what the weights say): the CPU recipe's, and GPT-2 small's shape with GPT-2's 50,257-token
vocabulary (124M parameters), on the CPU by default.

    python -m benchmarks.evaluate_speed --preset cpu gpt2-small --threads 2

Each item has HellaSwag's shape in tokens (a 40-token context, 4 choices of 20 tokens: the context runs once and
its choices as one batch after it), written as a JSONL task of characters for a character vocabulary of the
model's size. Items per second is the task's scoring time as `evaluate` records it (`seconds`: not loading the
model), the median of `--rounds` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import RECIPES, recipe_model
from gpt_lightning.evaluation import evaluate
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sources import METADATA_KEY, MODEL_PREFIX, metadata
from gpt_lightning.tokenizer import CharTokenizer

VOCAB_SIZES = {"gpt2-small": 50_257}  # GPT-2's: its embedding and head are a third of its 124M; the others: 65
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"


def write_checkpoint(config: GPTConfig, path: Path) -> int:
    """Untrained weights of `config` as one of our checkpoints, with a character vocabulary (of fewer tokens than
    the model's: the items use only these, and the model computes every logit all the same); its parameters."""
    torch.manual_seed(0)
    model = GPT(config)
    state = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, METADATA_KEY: metadata(config, CharTokenizer(ALPHABET))}, path)
    return model.num_parameters()


def write_items(path: Path, items: int, choices: int, context_tokens: int, choice_tokens: int) -> Path:
    rng = random.Random(0)

    def text(n: int) -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(n))

    rows = [
        {"context": text(context_tokens), "choices": [text(choice_tokens) for _ in range(choices)], "label": 0}
        for _ in range(items)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def items_per_second(ckpt: Path, task: Path, batch_size: int, device: str) -> float:
    with contextlib.redirect_stdout(io.StringIO()):  # evaluate's table
        [scored] = evaluate(str(ckpt), [str(task)], batch_size=batch_size, device=device)["tasks"]
    return scored["n"] / max(scored["seconds"], 1e-3)  # recorded to the millisecond


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(RECIPES), default=["cpu", "gpt2-small"])
    parser.add_argument("--items", type=int, default=200, help="items per round")
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--context-tokens", type=int, default=40)
    parser.add_argument("--choice-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="evaluate's batch_size: choices per forward pass")
    parser.add_argument("--rounds", type=int, default=3, help="after one warm-up round of a tenth of the items")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configs = {name: recipe_model(name, vocab_size=VOCAB_SIZES.get(name, 65)) for name in args.preset}
    for name, config in configs.items():  # the context once, then its choices: the path evaluate takes where it fits
        if args.context_tokens + args.choice_tokens - 1 > config.block_size:
            item = f"{args.context_tokens} + {args.choice_tokens} tokens"
            parser.error(f"an item of {item} does not fit {name}'s block_size {config.block_size}: give fewer "
                         "--context-tokens or --choice-tokens")  # fmt: skip
    torch.set_num_threads(args.threads)
    print(f"device={args.device} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
          f"torch threads={torch.get_num_threads()} items={args.items} choices={args.choices} "
          f"context={args.context_tokens} tokens choice={args.choice_tokens} tokens batch_size={args.batch_size} "
          f"rounds={args.rounds}")  # fmt: skip
    print(f"| preset | parameters | block_size | vocab | items/s (median of {args.rounds}) | rounds (items/s) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs.items():
            ckpt = Path(tmp) / f"{name}.ckpt"
            parameters = write_checkpoint(config, ckpt)
            size = (args.items, args.choices, args.context_tokens, args.choice_tokens)
            task = write_items(Path(tmp) / f"{name}.jsonl", *size)
            warm_up = write_items(Path(tmp) / f"{name}-warm-up.jsonl", max(1, args.items // 10), *size[1:])
            items_per_second(ckpt, warm_up, args.batch_size, args.device)
            rounds = [items_per_second(ckpt, task, args.batch_size, args.device) for _ in range(args.rounds)]
            shown = ", ".join(f"{r:,.1f}" for r in rounds)
            print(f"| {name} | {parameters / 1e6:,.1f}M | {config.block_size} | {config.vocab_size:,} | "
                  f"{statistics.median(rounds):,.1f} | {shown} |")  # fmt: skip
            ckpt.unlink()  # GPT-2 small: 500 MB


if __name__ == "__main__":
    main()
