"""The share of padded positions in a task fine-tune's training batches: one example a row, padded to the longest
of its batch, against examples packed into rows of the block size (`--data.pack true`), for the built-in tasks
at configs/finetune_task.yaml's batch size.

    python -m benchmarks.padding --data-dir ../shared/data

The rows are the CPU recipe's context (configs/pretrain_cpu.yaml's block size, that of the checkpoint the task
recipe starts from). The shares are over an epoch of each task's training examples (TaskDataModule.padding),
from their lengths in characters, which are the tokens of a character vocabulary: no model runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from benchmarks.common import CONFIGS, recipe_settings
from gpt_lightning.data.synthetic_tasks import TASK_NAMES
from gpt_lightning.training.task_datamodule import TaskDataModule


def main(argv: Sequence[str] | None = None) -> None:
    recipe = recipe_settings([CONFIGS / "finetune_task.yaml"])["data"]["init_args"]
    context = recipe_settings([CONFIGS / "pretrain_cpu.yaml"])["data"]["block_size"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), help="built-in tasks (or reverse-words:PATH)")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt (reverse-words)")
    parser.add_argument("--batch-size", type=int, default=recipe["batch_size"], help="the task recipe's by default")
    parser.add_argument("--block-size", type=int, default=context, help="the CPU recipe's context by default")
    parser.add_argument("--task-examples", type=int, default=10000, help="training examples of each task")
    args = parser.parse_args(argv)

    print(f"batches of {args.batch_size} examples, rows of {args.block_size} tokens, an epoch of each task")
    print("| task | examples | tokens an example | padding, padded | padding, packed | positions, packed / padded |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        settings = {"task": task, "task_examples": args.task_examples, "data_dir": args.data_dir,
                    "batch_size": args.batch_size, "block_size": args.block_size}  # fmt: skip
        padded, packed = TaskDataModule(**settings), TaskDataModule(**settings, pack=True)
        lengths = [x.numel() for x, _ in padded.encoded["train"]]
        shares = padded.padding(), packed.padding()
        tokens = f"{min(lengths)} to {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}"
        print(f"| {task.partition(':')[0]} | {len(lengths):,} | {tokens} | {shares[0]:.1%} | {shares[1]:.1%} | "
              f"{(1 - shares[0]) / (1 - shares[1]):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
