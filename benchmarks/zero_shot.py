"""Zero-shot scores of the built-in tasks: the CPU recipe's model and nanoGPT's CPU recipe, 3 seeds each,
against chance, and the tasks along one pre-training run (docs/evaluation.md).

Trains each recipe once per seed with `main.py fit` (a finished run is reused), scores every last.ckpt with
`evaluate` on the built-in tasks, all their items, and prints mean and standard deviation over the seeds.
The first recipe's first seed also scores the tasks at each of 4 validations (`--task_scores.tasks`), and
one step of the same recipe gives the untrained end of that curve. Options it does not know go to every
`fit` (e.g. --trainer.limit_val_batches=2 for a quick look).

    python -m benchmarks.zero_shot --runs runs/zero_shot --data-dir ../shared/data --plot docs/task_scores.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RECIPES, ROOT, config_args, recipe_files, recipe_settings, scalars
from gpt_lightning.evaluation import BUILTIN_TASKS, evaluate

CHANCE = 0.25
POINTS = 4  # validations along the first run, each with task scores


def train(preset: str, seed: int, runs: Path, data_dir: str, steps: int, *extra: str) -> Path:
    """The run folder of `preset` trained for `steps` with `seed` (<preset>-s<seed>, -step1 for one step); a
    finished run is reused."""
    name = f"{preset}-s{seed}" + ("-step1" if steps == 1 else "")
    run = runs / name / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        done = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        if done == steps:
            return run
        raise SystemExit(f"{run} stopped at step {done} of {steps}: resume it (--ckpt_path last) or remove it.")
    command = [sys.executable, str(ROOT / "main.py"), "fit", *config_args(recipe_files(preset)),
               f"--seed_everything={seed}", f"--data.data_dir={data_dir}",
               f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.logger.init_args.name={name}",
               f"--trainer.max_steps={steps}", "--progress_bar.refresh_rate=0", *extra]  # fmt: skip
    print(f"training {name}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=runs)
    return run


def scores_of(run: Path, data_dir: str, limit: int | None) -> dict[str, dict[str, Any]]:
    """{task: its metrics} of the run's last.ckpt on every built-in task (its first `limit` items)."""
    with contextlib.redirect_stdout(io.StringIO()):  # the table is printed below, seeds side by side
        result = evaluate(str(run / "checkpoints" / "last.ckpt"), list(BUILTIN_TASKS), limit=limit, data_dir=data_dir)
    return {task["name"]: task["metrics"] for task in result["tasks"]}


def final_val_loss(run: Path) -> float:
    return scalars(run)["val/loss"][-1][1]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/zero_shot"), help="where the runs go (reused)")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--presets", nargs="+", choices=sorted(RECIPES), default=["cpu", "cpu-nanogpt"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1, help="torch threads when scoring")
    parser.add_argument("--max-steps", type=int, help="train this many steps (default: each recipe's own)")
    parser.add_argument("--limit", type=int, help="score each task's first LIMIT items (default: all)")
    parser.add_argument("--plot", type=Path, help="write the along-training plot here (needs matplotlib)")
    args, fit_options = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    runs = args.runs.absolute()
    runs.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).absolute())

    def max_steps(preset: str) -> int:
        return args.max_steps or int(recipe_settings(recipe_files(preset))["trainer"]["max_steps"])

    first = args.presets[0]
    along = [
        f"--trainer.val_check_interval={max_steps(first) // POINTS}",
        f"--task_scores.tasks=[{', '.join(BUILTIN_TASKS)}]",
        f"--task_scores.limit={args.limit or 'null'}",
        *fit_options,
    ]
    table: dict[str, list[dict[str, dict[str, Any]]]] = {}
    losses: dict[str, list[float]] = {}
    for preset in args.presets:
        for seed in args.seeds:
            extra = along if (preset, seed) == (first, args.seeds[0]) else fit_options
            run = train(preset, seed, runs, data_dir, max_steps(preset), *extra)
            table.setdefault(preset, []).append(scores_of(run, data_dir, args.limit))
            losses.setdefault(preset, []).append(final_val_loss(run))
    untrained = train(first, args.seeds[0], runs, data_dir, 1, *fit_options)

    seeds = ", ".join(map(str, args.seeds))
    print(f"zero-shot acc, mean ± sd over seeds {seeds}; chance {CHANCE}; n items per task")
    print(f"{'task':<11} {'n':>4}  " + "  ".join(f"{p:>14}" for p in args.presets))
    for task in BUILTIN_TASKS:
        n = table[first][0][task]["acc"]["n"]
        cells = [mean_sd([s[task]["acc"]["value"] for s in table[p]]) for p in args.presets]
        print(f"{task:<11} {n:>4}  " + "  ".join(f"{c:>14}" for c in cells))
    print(f"{'val/loss':<11} {'':>4}  " + "  ".join(f"{mean_sd(losses[p]):>14}" for p in args.presets))
    for preset in args.presets:
        for metric in ("acc_norm", "acc_norm_bytes"):
            cells = [f"{t} {mean_sd([s[t][metric]['value'] for s in table[preset]])}" for t in BUILTIN_TASKS]
            print(f"{preset} {metric}: " + "; ".join(cells))

    logged = scalars(runs / f"{first}-s{args.seeds[0]}" / "version_0")
    at_step_1 = scores_of(untrained, data_dir, args.limit)
    # TensorBoard's step s holds the validation after s + 1 updates
    curve = {task: [(1, at_step_1[task]["acc"]["value"])] + [(s + 1, v) for s, v in logged[f"val/{task}/acc"]]
             for task in BUILTIN_TASKS}  # fmt: skip
    steps = [step for step, _ in curve[next(iter(BUILTIN_TASKS))]]
    print(f"\nacc along one run ({first}, seed {args.seeds[0]}; step 1: one step of training), chance {CHANCE}")
    print(f"{'step':>5}  " + "  ".join(f"{task:>10}" for task in BUILTIN_TASKS))
    for k, step in enumerate(steps):
        print(f"{step:>5}  " + "  ".join(f"{curve[task][k][1]:>10.3f}" for task in BUILTIN_TASKS))
    if args.plot:
        plot(curve, first, args.seeds[0], args.plot)
        print(f"wrote {args.plot}")


def plot(curve: dict[str, list[tuple[int, float]]], preset: str, seed: int, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=120)
    for task, points in curve.items():
        axes.plot(*zip(*points, strict=True), marker="o", label=task)
    axes.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set_xlabel("training step")
    axes.set_ylabel("zero-shot accuracy")
    axes.set_ylim(0, 1)
    axes.set_title(f"Built-in tasks along one pre-training run ({preset} recipe, seed {seed})")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)


if __name__ == "__main__":
    main()
