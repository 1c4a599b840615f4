"""Share of a recipe's wall time spent in validation, at the recipe's own cadence.

Runs `fit` with the recipe for `--intervals` validation intervals and times training and validation
separately (validation covers the whole validation split, as in every run).

    python -m benchmarks.validation_share --preset cpu --data-dir ../shared/data --threads 2

`--train-steps N` is for recipes too slow to run whole intervals on the machine at hand: it times N
training steps and one validation, and scales the training time to the recipe's interval.

    python -m benchmarks.validation_share --preset baby-gpt --data-dir ../shared/data --train-steps 8

`--task-scores TASK ...` scores tasks at each validation (`--task_scores.tasks`, `--task-limit` items each)
and times them apart from the validation pass over the split:

    python -m benchmarks.validation_share --preset cpu --data-dir ../shared/data --threads 1 \
        --task-scores spelling next-word next-line who-speaks
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import lightning as L
import torch

from benchmarks.common import RECIPES, callbacks_of, config_args, recipe_cli, recipe_files, recipe_settings
from gpt_lightning.commands.device import synchronize
from gpt_lightning.training.callbacks import TaskScores
from gpt_lightning.training.module import GPTModule


class PhaseTimer(L.Callback):
    def __init__(self) -> None:
        self.validation = 0.0
        self.validations = 0
        self.total = 0.0
        self._t0 = self._v0 = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        if not trainer.sanity_checking:
            self.validation += time.perf_counter() - self._v0
            self.validations += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        synchronize(pl_module.device)
        self.total = time.perf_counter() - self._t0


def timed_task_scores(trainer: L.Trainer) -> list[float]:
    """The seconds each validation's task scoring takes (the TaskScores callback's work), as it runs."""
    [scores] = [cb for cb in callbacks_of(trainer) if isinstance(cb, TaskScores)]
    seconds: list[float] = []
    score = scores.on_validation_epoch_end

    def timed(trainer: L.Trainer, pl_module: GPTModule) -> None:
        synchronize(pl_module.device)
        start = time.perf_counter()
        score(trainer, pl_module)
        synchronize(pl_module.device)
        if not trainer.sanity_checking:
            seconds.append(time.perf_counter() - start)

    scores.on_validation_epoch_end = timed  # type: ignore[method-assign]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--data-path", help="a text file to train on instead of tiny Shakespeare")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--intervals", type=int, default=2, help="validation intervals to run")
    parser.add_argument(
        "--train-steps", type=int, default=0, help="time this many steps and scale (0: whole intervals)"
    )
    parser.add_argument("--task-scores", nargs="*", default=[], help="tasks to score at each validation")
    parser.add_argument("--task-limit", type=int, default=200, help="items of each task (--task_scores.limit)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = recipe_files(args.preset)
    interval = int(recipe_settings(configs)["trainer"]["val_check_interval"])
    steps = args.train_steps or interval * args.intervals
    with tempfile.TemporaryDirectory() as log_dir:
        cli = recipe_cli(
            [
                *config_args(configs),
                f"--data.data_dir={args.data_dir}",
                *([f"--data.path={args.data_path}"] if args.data_path else []),
                f"--trainer.accelerator={args.device}",
                f"--trainer.precision={args.precision}",
                f"--trainer.max_steps={steps}",
                f"--trainer.val_check_interval={min(steps, interval)}",
                f"--trainer.logger.init_args.save_dir={log_dir}",
                "--trainer.num_sanity_val_steps=0",
                f"--task_scores.tasks=[{', '.join(args.task_scores)}]",
                f"--task_scores.limit={args.task_limit}",
            ]
        )
        timer = PhaseTimer()
        callbacks_of(cli.trainer).append(timer)
        task_seconds = timed_task_scores(cli.trainer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    timer.validation -= sum(task_seconds)  # the pass over the validation split alone
    training = timer.total - timer.validation - sum(task_seconds)
    validations = timer.validations
    print(f"preset={args.preset} val_check_interval={interval} steps={steps} threads={args.threads}")
    print(f"training {training:.1f} s ({training / steps:.3f} s/step), validation {timer.validation:.1f} s "
          f"({validations} full pass{'es' if validations > 1 else ''} over the validation split)")  # fmt: skip
    # Per interval: `interval` training steps, then one validation.
    per_interval_training = training / steps * interval
    per_validation = timer.validation / validations
    share = per_validation / (per_interval_training + per_validation)
    scaled = f", training time scaled from {steps} steps" if args.train_steps else ""
    print(f"validation share of wall time at val_check_interval={interval}{scaled}: {share:.1%}")
    if task_seconds:
        per_scoring = sum(task_seconds) / len(task_seconds)
        print(
            f"task scores ({', '.join(args.task_scores)}; {args.task_limit} items each): {per_scoring:.1f} s per "
            f"validation, {per_scoring / per_validation:.2f}x the validation pass ({per_validation:.1f} s)"
        )


if __name__ == "__main__":
    main()
