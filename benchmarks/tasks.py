"""Does pre-training help a task? Each built-in task (addition-2, addition-3, reverse-words) learned six ways,
3 seeds each, scored on its held-out test problems by `evaluate` (exact match), on the CPU (docs/fine-tuning.md).

    python -m benchmarks.tasks --runs runs/tasks --data-dir ../shared/data --jobs 2

The ways, all with configs/finetune_task.yaml and the CPU trainer (its AdamW 1e-3 unless said):
- scratch: the CPU recipe's network and optimizer (configs/pretrain_cpu.yaml first: Muon 0.02 for the blocks'
  matrices), trained on the task alone, for the fine-tunes' steps;
- scratch-adamw: the same with AdamW alone, the fine-tunes' optimizer;
- scratch-compute: as scratch, for as many more steps as the pre-training's tokens buy at the task's tokens
  per step (a batch's examples padded to the longest: the same network, so equal FLOPs);
- full: the CPU recipe's pre-trained checkpoint (one per seed, trained here), every weight fine-tuned;
- full-muon: the same with the pre-training's optimizer, Muon;
- lora: the same checkpoint with LoRA (rank 8, learning rate 1e-2, the config's suggestion), on reverse-words
  only: LoRA freezes the embedding, so the rows a grown vocabulary adds could not learn.

A digit-free pre-training vocabulary cannot read addition: those fine-tunes grow the vocabulary
(`--data.grow_vocab true`). Forgetting: bits per character of the held-out plays (the corpus's validation split)
before and after each fine-tune, scored by `evaluate` as text. Wall time: each `main.py fit` process from start
to exit, validations and their task scores included, with OMP_NUM_THREADS=1 and `--jobs` fits at a time.

A finished run is reused; a partial one is trained again. Options after the known ones go to every fit, e.g.
`--model.n_layer=1` for a tiny check.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import ROOT, child_env, config_args, recipe_files, recipe_settings
from gpt_lightning.data.corpus import atomic_write_bytes, corpus_path, validation_start
from gpt_lightning.data.instruct import ExampleBatches
from gpt_lightning.data.synthetic_tasks import TASK_NAMES
from gpt_lightning.training.task_datamodule import TaskDataModule

FINETUNE = [ROOT / "configs" / "finetune_task.yaml", ROOT / "configs" / "trainer" / "cpu.yaml"]
WAYS = ("scratch", "scratch-adamw", "scratch-compute", "full", "full-muon", "lora")
LORA = ["--model.lora.rank=8", "--model.learning_rate=1e-2"]
GROWS = ("addition-2", "addition-3")  # tasks whose characters tiny Shakespeare lacks
# TensorBoard's sample after each validation, in the task's own characters (a from-scratch vocabulary has no others)
SAMPLE_PROMPTS = {"addition-2": "12+34", "addition-3": "123+456", "reverse-words": "hello"}


@dataclass
class Run:
    name: str
    args: list[str]
    steps: int
    scored: list[str]  # evaluate's tasks for its last.ckpt
    after: list[Run] = field(default_factory=list)  # runs that start from this one's checkpoint

    def folder(self, runs: Path) -> Path:
        return runs / self.name / "version_0"

    def last(self, runs: Path) -> Path:
        return self.folder(runs) / "checkpoints" / "last.ckpt"


def finished_step(last: Path) -> int | None:
    if not last.is_file():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])


def execute(run: Run, runs: Path, data_dir: str, extra: list[str]) -> None:
    """Trains `run` (unless finished), then scores it into <name>/scores.json, then its followers in turn."""
    record = runs / run.name / "scores.json"
    if finished_step(run.last(runs)) != run.steps or not record.is_file():
        if (runs / run.name).exists():
            print(f"{run.name}: partial, trained again", file=sys.stderr, flush=True)
            shutil.rmtree(runs / run.name)
        log = runs / f"{run.name}.log"
        command = [sys.executable, str(ROOT / "main.py"), "fit", *run.args, f"--data.data_dir={data_dir}",
                   f"--trainer.max_steps={run.steps}", f"--trainer.logger.init_args.save_dir={runs}",
                   f"--trainer.logger.init_args.name={run.name}", "--progress_bar.refresh_rate=0", *extra]  # fmt: skip
        started = time.perf_counter()
        with log.open("w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=runs,
                                  env=child_env(OMP_NUM_THREADS="1"))  # fmt: skip
        seconds = time.perf_counter() - started
        if done.returncode != 0 or finished_step(run.last(runs)) != run.steps:
            raise SystemExit(f"{run.name} failed (exit {done.returncode}); its output: {log}")
        scores = runs / run.name / "evaluate.json"
        evaluated = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "evaluate", f"--ckpt_path={run.last(runs)}",
             f"--tasks=[{', '.join(run.scored)}]", f"--data_dir={data_dir}", f"--output={scores}"],
            capture_output=True, text=True, cwd=runs, env=child_env(OMP_NUM_THREADS="1"),
        )  # fmt: skip
        if evaluated.returncode != 0:
            raise SystemExit(f"evaluate of {run.name} failed:\n{evaluated.stderr[-3000:]}")
        metrics = {t["name"]: t["metrics"] for t in json.loads(scores.read_text())["tasks"]}
        atomic_write_bytes(record, json.dumps({"seconds": seconds, "metrics": metrics}, indent=1).encode())
        print(f"{run.name}: {run.steps} steps in {seconds:.0f} s", file=sys.stderr, flush=True)
    for follower in run.after:
        execute(follower, runs, data_dir, extra)


def tokens_per_step(task: str, data_dir: str, batch_size: int, seed: int, batches: int = 200) -> float:
    """The mean tokens of a training batch of `task` (its examples padded to the longest of them)."""
    data = TaskDataModule(task=task, data_dir=data_dir, batch_size=batch_size, seed=seed)
    stream = ExampleBatches(data.encoded["train"], batch_size, seed=seed)
    return statistics.fmean(stream.batch(i).inputs.numel() for i in range(batches))


def held_out_plays(data_dir: str, runs: Path) -> Path:
    """The corpus's validation split (its last 10%, as the CPU recipe holds out) as a text file for `evaluate`."""
    text = corpus_path(data_dir).read_text(encoding="utf-8")
    path = runs / "held_out_plays.txt"
    atomic_write_bytes(path, text[validation_start(len(text), 0.1) :].encode("utf-8"))
    return path


def finetune_steps(args: argparse.Namespace) -> int:
    """The fine-tunes' steps: --steps, else configs/finetune_task.yaml's."""
    return int(recipe_settings(FINETUNE)["trainer"]["max_steps"]) if args.steps is None else args.steps


def plan(args: argparse.Namespace, data_dir: str, runs: Path, plays: Path) -> tuple[list[Run], dict[str, int]]:
    """The runs to train: per seed a pre-training (its fine-tunes follow it) and the from-scratch runs."""
    pretrain = recipe_settings(recipe_files("cpu"))
    pretrain_steps = args.pretrain_steps or int(pretrain["trainer"]["max_steps"])
    pretrain_tokens = pretrain["data"]["batch_size"] * pretrain["data"]["block_size"] * pretrain_steps
    steps = finetune_steps(args)
    batch = int(recipe_settings(FINETUNE)["data"]["init_args"]["batch_size"])
    compute = {task: steps + math.ceil(pretrain_tokens / tokens_per_step(task, data_dir, batch, 1))
               for task in args.tasks}  # fmt: skip
    lm = f"lm:{plays}"
    roots: list[Run] = []
    for seed in args.seeds:
        seeded = [f"--seed_everything={seed}", f"--data.seed={seed}"]
        base = Run(f"pretrain-s{seed}", [*config_args(recipe_files("cpu")), *seeded], pretrain_steps, [lm])
        roots.append(base)
        for task in args.tasks:
            task_args = [
                *config_args(FINETUNE),
                f"--data.task={task}",
                f"--sample.prompt={SAMPLE_PROMPTS[task]}",
                *seeded,
            ]
            start = [f"--model.init_from={base.last(runs)}"] + (["--data.grow_vocab=true"] if task in GROWS else [])
            base.after.append(Run(f"{task}-full-s{seed}", [*task_args, *start], steps, [task, lm]))
            muon = [*task_args, *start, "--model.optimizer=muon"]
            base.after.append(Run(f"{task}-full-muon-s{seed}", muon, steps, [task, lm]))
            if task not in GROWS:  # LoRA freezes the embedding: grown rows could not learn (data.grow_vocab refuses)
                base.after.append(Run(f"{task}-lora-s{seed}", [*task_args, *start, *LORA], steps, [task, lm]))
            scratch = [*config_args(recipe_files("cpu")), *task_args, "--model.init_from=null"]
            roots.append(Run(f"{task}-scratch-s{seed}", scratch, steps, [task]))
            roots.append(Run(f"{task}-scratch-adamw-s{seed}", [*scratch, "--model.optimizer=adamw"], steps, [task]))
            roots.append(Run(f"{task}-scratch-compute-s{seed}", scratch, compute[task], [task]))
    return roots, compute


def mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{sd}"


def report(args: argparse.Namespace, runs: Path, compute: dict[str, int], plays: Path) -> None:
    def read(name: str) -> dict | None:
        path = runs / name / "scores.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def bpc(record: dict) -> float:
        return record["metrics"][plays.stem]["bits_per_char"]["value"]

    base = [r for s in args.seeds if (r := read(f"pretrain-s{s}"))]
    print(
        f"\npre-training (configs/pretrain_cpu.yaml): {len(base)} seeds, held-out plays "
        f"{mean_sd([bpc(r) for r in base])} bits/char, {mean_sd([r['seconds'] for r in base], 0)} s per fit"
    )
    print(
        "\n| task | way | steps | exact match (test) | held-out plays, bits/char (pre-trained: "
        f"{mean_sd([bpc(r) for r in base])}) | fit wall time (s) | seeds |"
    )
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for way in WAYS:
            if way == "lora" and task in GROWS:
                continue
            records = [r for s in args.seeds if (r := read(f"{task}-{way}-s{s}"))]
            match = [r["metrics"][task]["exact_match"]["value"] for r in records]
            forgetting = mean_sd([bpc(r) for r in records]) if way.startswith(("full", "lora")) else "–"
            steps = compute[task] if way == "scratch-compute" else finetune_steps(args)
            print(f"| {task} | {way} | {steps} | {mean_sd(match)} | {forgetting} | "
                  f"{mean_sd([r['seconds'] for r in records], 0)} | {len(records)} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/tasks"), help="where the runs go (reused)")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: configs/finetune_task.yaml's)")
    parser.add_argument("--pretrain-steps", type=int, help="default: configs/pretrain_cpu.yaml's (a tiny check: fewer)")
    parser.add_argument("--jobs", type=int, default=2, help="fits at a time, each on one thread")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    args, extra = parser.parse_known_args()
    runs = args.runs.absolute()
    runs.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).absolute())
    plays = held_out_plays(data_dir, runs)
    roots, compute = plan(args, data_dir, runs, plays)
    print(f"equal compute: {', '.join(f'{task} {steps} steps' for task, steps in compute.items())}", flush=True)
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:  # threads that wait on fit processes
            for future in [pool.submit(execute, root, runs, data_dir, extra) for root in roots]:
                future.result()
    report(args, runs, compute, plays)


if __name__ == "__main__":
    main()
