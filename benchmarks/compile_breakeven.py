"""When torch.compile pays: a recipe's fit eager and compiled, taking turns, every training batch timed.

The first batch of a compiled fit compiles the forward and backward; the cost is that batch's time less an
eager first batch. Break-even is that cost over the time a compiled step saves. Each fit gets an empty
cache folder of its own (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), so that every compiled fit pays in full,
C++ and Triton kernels included, as on a machine that never compiled this model.
Within one process a second compiled fit reuses the first one's code: each fit runs in a fresh process.
Arguments it does not know go to the CLI of every fit (`--model.n_layer=4`, `--trainer.precision=bf16-mixed`).

    python -m benchmarks.compile_breakeven --preset cpu --data-dir ../shared/data --threads 2
    python -m benchmarks.compile_breakeven --preset baby-gpt --data-dir data --device cuda --mode reduce-overhead
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import child_env, module_command
from gpt_lightning.commands.device import synchronize


def one_fit(args: argparse.Namespace, cli_args: list[str], compile: str) -> dict[str, float]:
    """In this process: the fit's first batch, in s, and the median of the batches after the first ten, in ms."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from benchmarks.common import callbacks_of, config_args, recipe_cli, recipe_files

    class BatchTimes(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, *_: Any) -> None:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *_: Any) -> None:
            synchronize(pl_module.device)
            self.seconds.append(time.perf_counter() - self.start)

    if args.threads:
        torch.set_num_threads(args.threads)
    data = [f"--data.path={args.data_path}"] if args.data_path else [f"--data.data_dir={args.data_dir}"]
    with tempfile.TemporaryDirectory() as runs:
        cli = recipe_cli([*config_args(recipe_files(args.preset)), *data, f"--trainer.max_steps={args.steps}",
                          "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                          f"--trainer.logger.init_args.save_dir={runs}", "--progress_bar.refresh_rate=0",
                          "--sample.every_n_validations=0", "--last_checkpoint.every_n_train_steps=0",
                          "--checkpoint.save_top_k=0", f"--trainer.accelerator={args.device}",
                          f"--model.compile={compile}", *cli_args])  # fmt: skip
        times = BatchTimes()
        callbacks_of(cli.trainer).append(times)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    later = times.seconds[min(10, len(times.seconds) - 1) :]
    return {"first_s": times.seconds[0], "step_ms": 1000 * statistics.median(later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="a recipe of benchmarks.common.RECIPES")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--data-path", help="a text file to train on instead of the corpus")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mode", default="true", help="model.compile: true, reduce-overhead or max-autotune")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each fit")
    parser.add_argument("--runs", type=int, default=2, help="fits of each kind, taking turns")
    parser.add_argument("--threads", type=int, help="torch threads (CPU)")
    parser.add_argument("--one-fit", help=argparse.SUPPRESS)
    args, cli_args = parser.parse_known_args()  # the rest goes to the CLI, e.g. --model.n_layer=4
    if args.one_fit:
        print(json.dumps(one_fit(args, cli_args, args.one_fit)))
        return
    forwarded = sys.argv[1:]
    results: dict[str, list[dict[str, float]]] = {"false": [], args.mode: []}
    for _ in range(args.runs):
        for compile in results:
            command = module_command("benchmarks.compile_breakeven", *forwarded, f"--one-fit={compile}")
            with tempfile.TemporaryDirectory() as cache:  # cold: nothing compiled before
                env = child_env(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"the fit with model.compile={compile} failed:\n{out.stderr[-3000:]}")
            results[compile].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"preset {args.preset}, {args.device}, {args.steps} steps a fit, {args.runs} fits of each, in turns; "
          f"threads {args.threads or os.cpu_count()}; each fit with empty compile caches")  # fmt: skip
    print("| model.compile | first batch (s) | median step (ms) |\n|---|---|---|")
    for compile, rows in results.items():
        print(f"| {compile} | " + ", ".join(f"{r['first_s']:.2f}" for r in rows) + " | "
              + ", ".join(f"{r['step_ms']:.2f}" for r in rows) + " |")  # fmt: skip
    eager, compiled = (results[k] for k in ("false", args.mode))
    cost = statistics.median(r["first_s"] for r in compiled) - statistics.median(r["first_s"] for r in eager)
    saved_ms = statistics.median(r["step_ms"] for r in eager) - statistics.median(r["step_ms"] for r in compiled)
    if saved_ms > 0:
        print(f"compiling costs {cost:.1f} s and saves {saved_ms:.2f} ms a step: break-even after "
              f"{cost / (saved_ms / 1000):,.0f} steps")  # fmt: skip
    else:
        print(f"compiling costs {cost:.1f} s and saves nothing a step ({-saved_ms:.2f} ms slower): it never pays here")


if __name__ == "__main__":
    main()
