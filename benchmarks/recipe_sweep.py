"""The CPU recipe's optimizer sweep: full-validation loss at fixed steps and at fixed training-time
budgets, for AdamW at several learning rates and Muon (+ AdamW for the rest) at several.

    python -m benchmarks.recipe_sweep --data-dir ../shared/data

Every run trains the CPU-recipe model (configs/pretrain_cpu.yaml's architecture, data and schedule
shape) through the project's own LightningCLI, module and data module, and validates on the whole
validation split every `--val-every` steps. Training time leaves the validations out.

1. Sweep: each point once, with the first seed.
2. Seeds: nanoGPT's recipe (AdamW 1e-3), the best AdamW and the best Muon point, again with the other
   seeds, so each of them has `len(--seeds)` runs.
3. Budget: the best Muon point (with --budget-every-muon-lr: every Muon point) with its step count cut
   so that its training time matches nanoGPT's recipe (its cosine schedule ends at the new step count),
   with every seed. This is the candidate for configs/pretrain_cpu.yaml: the lowest loss within
   nanoGPT's wall time.

Options after the known ones go to the CLI of every run, e.g. `--model.n_layer 6` for a larger model.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import callbacks_of, config_args, recipe_cli, recipe_files

NANOGPT_LR = 1e-3


class Timeline(Callback):
    """Records (step, training seconds, val/loss) at each validation; validation time is left out."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []
        self.training_s = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.training_s += time.perf_counter() - self._since

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.points.append((trainer.global_step, self.training_s, float(trainer.callback_metrics["val/loss"])))
        self._since = time.perf_counter()


@dataclass(eq=False)
class Point:
    optimizer: str
    lr: float
    steps: int  # the schedule's length
    stop_at: int | None = None  # stop early, on the schedule of `steps`
    runs: list[Timeline] = field(default_factory=list)

    @property
    def label(self) -> str:
        lr = f"AdamW {self.lr:g}" if self.optimizer == "adamw" else f"Muon {self.lr:g} + AdamW {NANOGPT_LR:g}"
        stop = f", stopped at {self.stop_at}" if self.stop_at is not None and self.stop_at < self.steps else ""
        return f"{lr}, {self.steps} steps{stop}"

    def final(self) -> float:
        return statistics.mean(run.points[-1][2] for run in self.runs)


def train(point: Point, seed: int, args: argparse.Namespace, cli_args: list[str]) -> Timeline:
    lr = [f"--model.learning_rate={point.lr}"] if point.optimizer == "adamw" else [
        f"--model.learning_rate={NANOGPT_LR}", f"--model.muon_learning_rate={point.lr}"]  # fmt: skip
    timeline = Timeline()
    with tempfile.TemporaryDirectory() as runs:
        cli = recipe_cli(
            [
                *config_args(recipe_files("cpu-nanogpt")),
                f"--data.data_dir={args.data_dir}",
                f"--model.optimizer={point.optimizer}",
                *lr,
                f"--model.min_lr={lr_floor(point)}",
                f"--trainer.max_steps={point.stop_at or point.steps}",
                f"--model.lr_decay_steps={point.steps}",
                f"--trainer.val_check_interval={args.val_every}",
                f"--seed_everything={seed}",
                f"--data.seed={seed}",
                f"--trainer.logger.init_args.save_dir={runs}",
                "--progress_bar.refresh_rate=0",
                "--trainer.enable_model_summary=false",
                "--sample.every_n_validations=0",
                "--last_checkpoint.every_n_train_steps=0",
                "--checkpoint.save_top_k=0",
                *cli_args,
            ]
        )
        callbacks_of(cli.trainer).append(timeline)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print(f"  {point.label}, seed {seed}: " + ", ".join(f"{v:.4f} @{s} ({t:.0f} s)" for s, t, v in timeline.points),
          flush=True)  # fmt: skip
    return timeline


def lr_floor(point: Point) -> float:
    # nanoGPT decays to a tenth of the peak; with Muon, AdamW's peak is nanoGPT's and Muon decays by the
    # same ratio (model.min_lr / model.learning_rate).
    return (point.lr if point.optimizer == "adamw" else NANOGPT_LR) / 10


def loss_at_step(run: Timeline, step: int) -> float | None:
    return next((v for s, _, v in run.points if s == step), None)


def loss_within(run: Timeline, budget_s: float) -> float | None:
    """The loss of the last validation whose training time fits the budget."""
    fitting = [v for _, t, v in run.points if t <= budget_s]
    return fitting[-1] if fitting else None


def cell(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if len(known) < len(values) or not known:
        return "–"
    if len(known) == 1:
        return f"{known[0]:.3f}"
    return f"{statistics.mean(known):.3f} ± {statistics.stdev(known):.3f}"


def seconds(values: list[float]) -> str:
    return f"{statistics.mean(values):.0f}" + (f" ± {statistics.stdev(values):.0f}" if len(values) > 1 else "")


def print_table(points: list[Point], steps: list[int], budgets: list[float]) -> None:
    header = ["recipe", "seeds", *(f"val @ {s}" for s in steps), *(f"val within {b:g} s" for b in budgets),
              "training time (s)"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for p in points:
        row = [p.label, str(len(p.runs)), *(cell([loss_at_step(r, s) for r in p.runs]) for s in steps),
               *(cell([loss_within(r, b) for r in p.runs]) for b in budgets),
               seconds([r.training_s for r in p.runs])]  # fmt: skip
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 6e-3])
    parser.add_argument("--muon-lrs", type=float, nargs="*", default=[0.01, 0.02])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--report-steps", type=int, nargs="+", default=[500, 1000, 1500, 2000])
    parser.add_argument("--budgets", type=float, nargs="+", help="training-time budgets in s (default: 40/60/80%% "
                        "of nanoGPT's recipe, and all of it)")  # fmt: skip
    parser.add_argument("--muon-stop-at", type=int, help="stop the sweep's Muon runs at this step (a Muon step "
                        "is much dearer on CPUs without native bfloat16)")  # fmt: skip
    parser.add_argument("--time-tolerance", type=float, default=0.1, help="how much longer than nanoGPT's recipe "
                        "a run may train and still count as within its wall time (runs vary by a few %%)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--budget-every-muon-lr", action="store_true", help="give every Muon point, not only the "
                        "best, the steps that fit nanoGPT's time (and no full-length seeds)")  # fmt: skip
    args, cli_args = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    first, others = args.seeds[0], args.seeds[1:]

    print(f"1. sweep, seed {first}", flush=True)
    points = [Point("adamw", lr, args.steps) for lr in args.adamw_lrs]
    points += [Point("muon", lr, args.steps, args.muon_stop_at) for lr in args.muon_lrs]
    for p in points:
        p.runs.append(train(p, first, args, cli_args))
    adamw = [p for p in points if p.optimizer == "adamw"]
    nanogpt = next((p for p in adamw if p.lr == NANOGPT_LR), None)
    best_adamw = min(adamw, key=Point.final)
    muons = [p for p in points if p.optimizer == "muon"]
    # Compare Muon points where all of them got to (they may have been stopped early).
    best_muon = min(muons, key=Point.final) if muons else None

    print(f"2. seeds {others}: nanoGPT's recipe, the best AdamW and the best Muon point", flush=True)
    # Muon runs stopped early are not candidates for the recipe: one seed shows how far they got.
    full_length_muon = best_muon and best_muon.stop_at is None and not args.budget_every_muon_lr
    candidates = (nanogpt, best_adamw, best_muon if full_length_muon else None)
    for p in dict.fromkeys(q for q in candidates if q is not None):
        for seed in others:
            p.runs.append(train(p, seed, args, cli_args))

    reference = nanogpt or best_adamw
    # Medians: a shared machine can stall a run for tens of seconds, and one stalled run would move a
    # mean (and so every budget) by a fifth.
    reference_s = statistics.median(r.training_s for r in reference.runs)
    if best_muon is not None:
        muon_s_per_step = statistics.median(r.training_s / r.points[-1][0] for p in muons for r in p.runs)
        budget_steps = min(args.steps, int(reference_s / muon_s_per_step / 100) * 100)
        warmup = 100
        if budget_steps < 2 * warmup:
            fit = reference_s / muon_s_per_step
            print(f"3. budget: a Muon step takes {muon_s_per_step * 1000:.0f} ms here; {reference_s:.0f} s of "
                  f"training fit {fit:.0f} steps, too few for a schedule: skipped")  # fmt: skip
        elif budget_steps < args.steps:
            for lr in [p.lr for p in muons] if args.budget_every_muon_lr else [best_muon.lr]:
                budgeted = Point("muon", lr, budget_steps)
                print(f"3. budget: {budgeted.label} fits the {reference_s:.0f} s of {reference.label}", flush=True)
                for seed in args.seeds:
                    budgeted.runs.append(train(budgeted, seed, args, cli_args))
                points.append(budgeted)

    budgets = args.budgets or [round(reference_s * f) for f in (0.4, 0.6, 0.8, 1.0)]
    print()
    print_table(points, [s for s in args.report_steps if s <= args.steps], budgets)
    seeded = [p for p in points if len(p.runs) == len(args.seeds)]
    # Runs of one optimizer cost the same per step; their times differ by the machine's drift. Judge
    # "within nanoGPT's time" by steps times the optimizer's median time per step over all its runs.
    per_step = {
        name: statistics.median(r.training_s / r.points[-1][0] for p in points if p.optimizer == name for r in p.runs)
        for name in {p.optimizer for p in points}
    }
    limit = (1 + args.time_tolerance) * reference.steps * per_step[reference.optimizer]
    within = [p for p in seeded if p.steps * per_step[p.optimizer] <= limit]
    best = min(within or seeded, key=Point.final)
    mean_s = statistics.mean(r.training_s for r in best.runs)
    medians = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in sorted(per_step.items()))
    print(f"\nmedian training time per step: {medians}")
    print(
        f"recipe_sweep: lowest val/loss within {reference.label}'s {reference_s:.0f} s of training: "
        f"{best.label}, {best.final():.4f} (mean of {len(best.runs)} seeds, {mean_s:.0f} s)"
    )
    assert all(math.isfinite(p.final()) for p in points)


if __name__ == "__main__":
    main()
