"""Wall time for a recipe to reach a full-validation loss, with its tokens/s and MFU.

The headline on a GPU:   python -m benchmarks.time_to_loss --preset baby-gpt --target 1.47
                  and:   python -m benchmarks.time_to_loss --preset baby-gpt-muon --target 1.47
On a CPU (and in CI):    python -m benchmarks.time_to_loss --preset cpu --target 2.0 --data-dir D

It trains the recipe's config through the project's own LightningCLI (module, data module, callbacks
and logger as `main.py fit` builds them) and stops at the first validation whose val/loss (the whole
validation split) is at or below the target. Any further arguments go to the CLI, e.g.
`--trainer.precision 16-mixed` or `--model.compile true`. Time is measured from the start of training;
the time spent validating is reported beside it, since a finer validation cadence finds the crossing
sooner but costs more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import RECIPES, callbacks_of, config_args, recipe_cli, recipe_files
from gpt_lightning.training.callbacks import TokenThroughput


class StopAtLoss(Callback):
    """Stops training at the first validation that reaches the target, timing training and validation."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.reached: tuple[int, float] | None = None  # (step, val/loss)
        self.elapsed = self.total = 0.0
        self.losses: list[tuple[int, float]] = []
        self.validating_s = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total = time.perf_counter() - self.start

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validating_s += time.perf_counter() - self._val_start
        loss = float(trainer.callback_metrics["val/loss"])
        self.losses.append((trainer.global_step, loss))
        if loss <= self.target and self.reached is None:
            self.reached, self.elapsed = (trainer.global_step, loss), time.perf_counter() - self.start
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(RECIPES), default="baby-gpt")
    parser.add_argument("--target", type=float, default=1.47, help="full-validation loss to reach")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--data-path", help="a text file to train on instead of the corpus")
    parser.add_argument("--val-every", type=int, help="validate every N steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args, cli_args = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = [f"--data.path={args.data_path}"] if args.data_path else [f"--data.data_dir={args.data_dir}"]
    cadence = [f"--trainer.val_check_interval={args.val_every}"] if args.val_every else []
    stop = StopAtLoss(args.target)
    with tempfile.TemporaryDirectory() as runs:
        cli = recipe_cli(
            [
                *config_args(recipe_files(args.preset)),
                *data,
                *cadence,
                f"--trainer.logger.init_args.save_dir={runs}",
                "--progress_bar.refresh_rate=0",
                "--sample.every_n_validations=0",
                "--last_checkpoint.every_n_train_steps=0",
                "--checkpoint.save_top_k=0",
                *cli_args,
            ]
        )
        callbacks_of(cli.trainer).append(stop)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    config, trainer = cli.model.config, cli.trainer
    print(f"\npreset {args.preset}: {config.n_layer} layers, {config.n_embd} wide, context {config.block_size}, "
          f"{cli.model.gpt.num_parameters() / 1e6:.2f}M parameters; device {trainer.strategy.root_device.type}, "
          f"precision {trainer.precision}")  # fmt: skip
    print("validations: " + ", ".join(f"{loss:.4f} @{step}" for step, loss in stop.losses))
    # Training throughput over the whole run, validation left out; MFU against the device's peak for the
    # run's precision, as train/mfu is logged.
    training_s = (stop.elapsed if stop.reached else stop.total) - stop.validating_s
    tokens = (
        trainer.global_step
        * trainer.accumulate_grad_batches
        * trainer.world_size
        * (cli.datamodule.batch_size * config.block_size)
    )
    peak = next((cb.peak_flops for cb in callbacks_of(trainer) if isinstance(cb, TokenThroughput)), None)
    rate = f"{tokens / training_s:,.0f} tokens/s" + (
        f", MFU {tokens * cli.model.flops_per_token / training_s / peak:.1%}" if peak
        else ", MFU n/a (no known peak FLOPs for this device)"
    )  # fmt: skip
    if trainer.strategy.root_device.type == "cuda":
        rate += f", peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB"
    if stop.reached is None:
        step, loss = stop.losses[-1] if stop.losses else (cli.trainer.global_step, float("nan"))
        print(f"time_to_loss: target {args.target} not reached: val/loss {loss:.4f} at step {step} ({rate})")
        sys.exit(2)
    step, loss = stop.reached
    print(f"time_to_loss: val/loss {loss:.4f} <= {args.target} at step {step} in {stop.elapsed:.1f} s "
          f"({stop.validating_s:.1f} s of it validating; {rate})")  # fmt: skip


if __name__ == "__main__":
    main()
