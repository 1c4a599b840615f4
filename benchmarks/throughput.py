"""Training throughput of `Trainer.fit` against a hand-written PyTorch loop, on the same model and batches.

(a) fit:   the LightningModule, DataModule, callbacks and logger that `python main.py fit --config <recipe>`
           builds, through `Trainer.fit`.
(b) plain: the same GPT class, optimizer (AdamW, or Muon and AdamW), schedule, clipping, precision and batches in a
           minimal loop.

Both run in one process and take turns every `--steps` optimizer steps: a callback pauses the fit, runs
the plain loop for its turn and hands back, in the order a b b a a b b a ... A round is one turn of
each. Turns of a second or so cancel the drift of a shared machine, whose speed can change by a third
within seconds; separate runs of several seconds each would mostly measure that drift.

The table reports every round, then the median of each column. The last line is the median of the
rounds' ratios: each compares two turns taken a second apart, on the same machine state. (The ratio of
the two median tokens/s can pair a fast-state fit with a slow-state plain loop.) `overhead` is how
much longer a fit step takes than a plain one; unlike the ratio it does not depend on model size.

    python -m benchmarks.throughput --preset cpu --data-dir ../shared/data --threads 2
    python -m benchmarks.throughput --preset baby-gpt --device cuda --precision bf16-mixed --compile
    python -m benchmarks.throughput --preset baby-gpt --device cuda --precision bf16-mixed --compile reduce-overhead

Any further arguments go to the fit's CLI (and so to the plain loop's model and batches too), e.g.
`--data.pin_memory=true` or `--model.n_layer=4`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, get_args

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks.common import RECIPES, callbacks_of, config_args, recipe_cli, recipe_files
from gpt_lightning.commands.device import synchronize
from gpt_lightning.data.corpus import RandomWindows
from gpt_lightning.model import GPT, CompileMode, compiled_forward
from gpt_lightning.optim import WarmupCosine
from gpt_lightning.training.cli import GPTLightningCLI
from gpt_lightning.training.datamodule import pin_memory_for


def build_cli(args: argparse.Namespace, log_dir: str) -> GPTLightningCLI:
    overrides = [
        f"--data.data_dir={args.data_dir}",
        *([f"--data.path={args.data_path}"] if args.data_path else []),
        f"--trainer.accelerator={args.device}",
        "--trainer.devices=1",
        f"--trainer.precision={args.precision}",
        f"--trainer.max_steps={total_steps(args)}",
        "--trainer.limit_val_batches=0",  # validation is not training throughput (see benchmarks.validation_share)
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        f"--progress_bar.refresh_rate={args.progress_bar_refresh}",
        "--last_checkpoint.every_n_train_steps=0",  # the plain loop saves nothing either
        f"--model.compile={args.compile}",
    ]
    if args.batch_size:
        overrides.append(f"--data.batch_size={args.batch_size}")
    return recipe_cli([*config_args(recipe_files(args.preset)), *overrides, *args.cli_args])


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.rounds * args.steps


class PlainLoop:
    """(b): the loop a user would write by hand, advanced `steps` optimizer steps at a time.

    Its turns run inside the fit, so process-wide settings are shared: TF32 matmuls on Ampere and newer,
    which the LightningModule's TF32Matmuls callback turns on at fit start, apply to both sides. It compiles
    the forward as the module does (`model.compile`), and pins its batches when the data module does.

    `reuse_batch`: every step trains on one batch, copied to the device once, so the data path costs
    nothing; a loop that steps as fast on its real batches never waits for data."""

    def __init__(self, args: argparse.Namespace, cli: GPTLightningCLI, reuse_batch: bool = False) -> None:
        data, module = cli.datamodule, cli.model
        self.device = torch.device("cuda" if args.device == "cuda" else "cpu")
        self.model = GPT(module.config).to(self.device)
        compile = {"false": False, "true": True}.get(args.compile, args.compile)
        self.forward: Callable[..., torch.Tensor] = compiled_forward(self.model, compile) or self.model.forward
        settings = module.optim
        # The module's own optimizer (AdamW, or Muon and AdamW), so that only Lightning differs between the loops.
        self.optimizer = settings.build(self.model, fused=self.device.type == "cuda")
        ratio = settings.min_lr / settings.learning_rate
        schedule = WarmupCosine(settings.warmup_steps, total_steps(args), min_ratio=ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        data.setup("fit")
        assert data.train_tokens is not None
        self.batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(
            RandomWindows(data.train_tokens, data.block_size, data.batch_size, data.seed)
        )
        self.pin = self.device.type == "cuda" and pin_memory_for(data.pin_memory, cli.trainer)  # CUDA pins
        self.resident = self._next_batch() if reuse_batch else None
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype is torch.float16)
        self.autocast: Callable[[], contextlib.AbstractContextManager[Any]] = (
            functools.partial(torch.autocast, self.device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext
        )
        self.max_norm = float(cli.trainer.gradient_clip_val or "inf")

    def run(self, steps: int) -> float:
        """Seconds that `steps` optimizer steps take."""
        self.model.train()
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            x, y = self.resident or self._next_batch()
            with self.autocast():
                logits = self.forward(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (t.pin_memory() if self.pin else t for t in next(self.batches))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class TakeTurns(L.Callback):
    """Times the fit in turns of `steps` optimizer steps and runs a turn of the plain loop between them,
    in the order a b b a a b b a ... so that neither side always goes first."""

    def __init__(self, plain: PlainLoop, warmup: int, steps: int) -> None:
        self.plain, self.warmup, self.steps = plain, warmup, steps
        self.fit_seconds: list[float] = []
        self.plain_seconds: list[float] = []
        self._turn_start = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        done = trainer.global_step - self.warmup
        if done < 0 or done % self.steps:
            return
        synchronize(pl_module.device)
        if done == 0:
            self.plain.run(self.warmup)
        else:
            self.fit_seconds.append(time.perf_counter() - self._turn_start)
            round_index = len(self.fit_seconds) - 1
            if round_index % 2 == 0:  # after a's turn in round 2k: b of round 2k, then b of round 2k + 1
                self.plain_seconds.append(self.plain.run(self.steps))
                if done < trainer.max_steps - self.warmup:
                    self.plain_seconds.append(self.plain.run(self.steps))
        self._turn_start = time.perf_counter()


@dataclasses.dataclass
class Measured:
    fit: list[float]  # seconds per step of each turn of (a)
    plain: list[float]  # and of (b), round by round
    tokens_per_step: int
    flops_per_token: int  # training FLOPs, for MFU


def measure(args: argparse.Namespace) -> Measured:
    """Seconds per step of each turn of (a) and (b), the tokens in a step and the FLOPs of a token."""
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build_cli(args, log_dir)
        turns = TakeTurns(PlainLoop(args, cli), args.warmup, args.steps)
        callbacks_of(cli.trainer).append(turns)
        with contextlib.redirect_stdout(sys.stderr):  # the progress bar; stdout keeps the table
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit, plain = ([seconds / args.steps for seconds in side] for side in (turns.fit_seconds, turns.plain_seconds))
    data = cli.datamodule
    return Measured(fit, plain, data.batch_size * data.block_size, cli.model.flops_per_token)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options below; the arguments they leave go to the fit's CLI, as `cli_args`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(RECIPES), default="cpu", help="recipe whose model and data to use")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--data-path", help="a text file to train on instead of tiny Shakespeare")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed or 16-mixed")
    parser.add_argument("--compile", nargs="?", const="true", default="false",
                        choices=["false", "true", *get_args(CompileMode)],
                        help="torch.compile the forward in both loops (alone: true, torch's default mode)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (set it: 2 cores here)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per turn of each side")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps of each side before the first round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds: one turn of each side")
    parser.add_argument("--batch-size", type=int, default=0, help="override the recipe's batch size")
    parser.add_argument("--progress-bar-refresh", type=int, default=10, help="fit's bar redraw cadence; 0 hides it")
    args, cli_args = parser.parse_known_args(argv)
    args.cli_args = cli_args
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    measured = measure(args)
    fit_seconds, plain_seconds, tokens_per_step = measured.fit, measured.plain, measured.tokens_per_step
    print(f"preset={args.preset} device={args.device} precision={args.precision} compile={args.compile} "
          f"threads={args.threads} tokens/step={tokens_per_step} steps/turn={args.steps}")  # fmt: skip
    print(f"{'round':>6}  {'fit tok/s':>10}  {'plain tok/s':>11}  {'fit/plain':>9}  {'overhead ms/step':>16}")

    def row(name: str, fit_rate: float, plain_rate: float, ratio: float, overhead_ms: float) -> None:
        print(f"{name:>6}  {fit_rate:>10,.0f}  {plain_rate:>11,.0f}  {ratio:>9.3f}  {overhead_ms:>16.2f}")

    columns: list[list[float]] = [[], [], [], []]
    for i, (fit, plain) in enumerate(zip(fit_seconds, plain_seconds, strict=True)):
        values = (tokens_per_step / fit, tokens_per_step / plain, plain / fit, 1000 * (fit - plain))
        row(str(i + 1), *values)
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    medians = [statistics.median(column) for column in columns]
    row("median", *medians)
    print(f"fit/plain tokens-per-second ratio: {medians[2]:.2f}")


if __name__ == "__main__":
    main()
