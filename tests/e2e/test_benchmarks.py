"""The benchmarks run end to end on generated text, as modules of one package, and print what the README
quotes."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.common import (
    RECIPES,
    child_env,
    config_args,
    module_command,
    recipe_files,
    recipe_model,
    recipe_settings,
)
from gpt_lightning.model import GPTConfig
from gpt_lightning.training.cli import GPTLightningCLI
from tests.conftest import ROOT, SHARED_CORPUS, SHARED_DATA, make_play

BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))


def run_benchmark(script: str, *args: str) -> list[str]:
    command = module_command(f"benchmarks.{script.removesuffix('.py')}", *args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path.cwd(), env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(ROOT.glob("config.yaml")), "a benchmark must not write into the checkout"
    return result.stdout.strip().splitlines()


def test_every_benchmark_imports_as_a_module_of_the_package_and_leaves_sys_path_alone():
    before = list(sys.path)
    for name in BENCHMARKS:
        assert callable(importlib.import_module(f"benchmarks.{name}").main), name
    assert sys.path == before


def test_the_docs_run_benchmarks_that_exist_as_modules():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml"))]
    text = "\n".join(path.read_text(encoding="utf-8") for path in docs)
    named = set(re.findall(r"python -m benchmarks\.(\w+)", text))
    assert {"recipe_sweep", "throughput", "time_to_loss", "transfer"} <= named <= set(BENCHMARKS), named
    assert "python benchmarks/" not in text, "run a benchmark as a module: python -m benchmarks.<name>"


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_a_benchmark_preset_is_its_recipe_as_the_cli_reads_it(preset: str, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py"])
    with pytest.raises(SystemExit) as exit_info:
        GPTLightningCLI(args=["fit", *config_args(recipe_files(preset)), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    parsed = yaml.safe_load(capsys.readouterr().out)
    model = parsed["model"]  # what the recipe leaves unset is None here: GPTConfig's default
    shape = {f.name: model[f.name] for f in dataclasses.fields(GPTConfig) if model.get(f.name) is not None}
    block_size = parsed["data"]["init_args"]["block_size"]
    assert recipe_model(preset) == GPTConfig(**{**shape, "vocab_size": 65, "block_size": block_size})
    settings = recipe_settings(recipe_files(preset))
    assert settings["trainer"]["val_check_interval"] == parsed["trainer"]["val_check_interval"]


def test_throughput_benchmark_prints_a_round_per_turn_and_the_ratio_line(text_file: Path):
    lines = run_benchmark("throughput.py", "--preset=cpu", f"--data-path={text_file}", "--threads=1",
                          "--rounds=3", "--steps=2", "--warmup=2")  # fmt: skip
    assert [line.split()[0] for line in lines[2:-1]] == ["1", "2", "3", "median"]
    row = r"\s*\w+\s+[\d,]+\s+[\d,]+\s+\d\.\d{3}\s+-?\d+\.\d{2}"
    assert all(re.fullmatch(row, line) for line in lines[2:-1]), lines
    assert re.fullmatch(r"fit/plain tokens-per-second ratio: \d\.\d\d", lines[-1])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_throughputs_plain_loop_steps_with_the_modules_own_optimizer(text_file: Path, tmp_path: Path, optimizer):
    # It once always built AdamW, so a Muon recipe's "Lightning overhead" was Muon's cost.
    from benchmarks.throughput import PlainLoop, build_cli, parse_args
    from gpt_lightning.optim import CombinedOptimizer

    args = parse_args(["--preset=cpu", f"--data-path={text_file}", f"--model.optimizer={optimizer}"])
    cli = build_cli(args, str(tmp_path))
    plain = PlainLoop(args, cli)
    assert isinstance(plain.optimizer, CombinedOptimizer) == (optimizer == "muon")


def test_compile_breakeven_compiles_every_fit_cold_in_a_cache_folder_of_its_own(monkeypatch, capsys):
    # Turning off the FX and autograd caches once left inductor's C++ kernels cached: a warm 6.1 s, not 20 s.
    from benchmarks import compile_breakeven

    caches: list[tuple[str, str, list[str]]] = []

    def fit(command, env, **kwargs):
        folder = env["TORCHINDUCTOR_CACHE_DIR"]
        caches.append((folder, env["TRITON_CACHE_DIR"], os.listdir(folder)))
        return subprocess.CompletedProcess(command, 0, stdout='{"first_s": 1.0, "step_ms": 2.0}\n', stderr="")

    monkeypatch.setattr(compile_breakeven.subprocess, "run", fit)
    monkeypatch.setattr(sys, "argv", ["compile_breakeven", "--runs=2"])
    compile_breakeven.main()
    assert len(caches) == 4 and len({folder for folder, _, _ in caches}) == 4  # no fit sees another's kernels
    assert all(listing == [] and triton.startswith(folder) for folder, triton, listing in caches)
    assert "compiling costs 0.0 s and saves nothing a step" in capsys.readouterr().out  # equal fake fits


@pytest.mark.slow  # two fresh processes, one of them compiling cold
def test_compile_breakeven_benchmark_times_eager_and_compiled_fits_and_prints_the_break_even(text_file: Path):
    tiny = ["--model.n_layer=1", "--model.n_embd=16", "--model.n_head=2"]  # forwarded to the CLI
    lines = run_benchmark("compile_breakeven.py", "--preset=cpu", f"--data-path={text_file}", "--threads=1",
                          "--steps=3", "--runs=1", *tiny)  # fmt: skip
    rows = [line for line in lines if re.fullmatch(r"\| (false|true) \| \d+\.\d\d \| \d+\.\d\d \|", line)]
    assert [row.split()[1] for row in rows] == ["false", "true"], lines
    assert re.fullmatch(r"compiling costs -?\d+\.\d s and saves .*", lines[-1]), lines


def test_validation_share_benchmark_scales_a_few_steps_to_the_recipes_interval(text_file: Path, tmp_path: Path):
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"context": "The king", "choices": [" is", " and"], "label": 0}) + "\n"
                            for _ in range(5)))  # fmt: skip
    lines = run_benchmark("validation_share.py", "--preset=cpu", f"--data-path={text_file}", "--threads=1",
                          "--train-steps=4", "--task-scores", str(task), "--task-limit=3")  # fmt: skip
    assert re.fullmatch(r"training [\d.]+ s \([\d.]+ s/step\), validation [\d.]+ s \(1 full pass .*\)", lines[-3])
    share = r"validation share of wall time at val_check_interval=\d+, training time scaled from 4 steps: [\d.]+%"
    assert re.fullmatch(share, lines[-2])
    tasks = (
        r"task scores \(.*mc.jsonl; 3 items each\): [\d.]+ s per validation, [\d.]+x the validation pass \([\d.]+ s\)"
    )
    assert re.fullmatch(tasks, lines[-1])


def test_padding_benchmark_prints_each_tasks_padding_padded_and_packed(tmp_path: Path, capsys):
    from benchmarks import padding

    text = tmp_path / "play.txt"
    text.write_text(make_play(100))
    padding.main(["--tasks", "addition-2", f"reverse-words:{text}", "--task-examples=300"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "batches of 32 examples, rows of 64 tokens, an epoch of each task"  # the recipes' settings
    row = r"\| ([\w-]+) \| [\d,]+ \| \d+ to \d+, mean [\d.]+ \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+) \|"
    rows = [re.fullmatch(row, line) for line in lines[3:]]
    assert all(rows) and [match.group(1) for match in rows if match] == ["addition-2", "reverse-words"], lines
    for match in rows:  # packing never pads more than one example a row
        assert match and float(match.group(3)) <= float(match.group(2)) and float(match.group(4)) <= 1


def test_generation_benchmark_compares_sampling_with_and_without_the_kv_cache():
    lines = run_benchmark("generation.py", "--preset=cpu", "--max-new-tokens=8", "--rounds=1", "--threads=1")
    assert re.fullmatch(r"\s*cpu\s+64\s+[\d,]+\s+[\d,]+\s+[\d.]+x", lines[-1]), lines


def test_evaluate_speed_benchmark_prints_items_per_second_and_the_threads_it_ran_on():
    lines = run_benchmark("evaluate_speed.py", "--preset", "cpu", "--items=4", "--rounds=2", "--threads=1")
    assert re.fullmatch(r"device=cpu OMP_NUM_THREADS=\S+ torch threads=1 items=4 choices=4 .*rounds=2", lines[0])
    assert re.fullmatch(r"\| cpu \| 0\.8M \| 64 \| 65 \| [\d,.]+ \| [\d,.]+, [\d,.]+ \|", lines[-1]), lines


def test_time_to_loss_benchmark_stops_at_the_first_validation_that_reaches_the_target(text_file: Path):
    lines = run_benchmark("time_to_loss.py", "--preset=cpu", f"--data-path={text_file}", "--target=3.3",
                          "--val-every=20", "--threads=1", "--trainer.max_steps=200")  # fmt: skip
    assert re.fullmatch(r"validations: (\d\.\d{4} @\d+, )*\d\.\d{4} @\d+", lines[-2])
    reached = (
        r"time_to_loss: val/loss (\d\.\d{4}) <= 3.3 at step (\d+) in [\d.]+ s "
        r"\([\d.]+ s of it validating; [\d,]+ tokens/s, MFU n/a .*\)"
    )
    match = re.fullmatch(reached, lines[-1])
    assert match and float(match.group(1)) <= 3.3 and int(match.group(2)) < 200, lines[-2:]


@pytest.mark.slow
def test_data_scale_benchmark_prints_a_row_per_size_and_data_path():
    lines = run_benchmark("data_scale.py", "--sizes-mb=0.3", "--in-memory-max-mb=0.3", "--no-ddp", "--threads=1")
    assert lines[0].startswith("| text | data path | encode (MB/s, 1 core)")
    number = r"[\d,.]+"
    cache = rf"\| 0\.3 MB \| token cache \| {number} \| {number} \| {number} \| nan \| {number} \|"
    again = r"n/a \(encodes again\)"
    before = rf"\| 0\.3 MB \| in memory \(before\) \| {number} \| {again} \| {number} \| nan \| {number} \|"
    assert re.fullmatch(cache, lines[2]) and re.fullmatch(before, lines[3]), lines


@pytest.mark.slow
def test_transfer_benchmark_reports_every_model_and_ends_with_the_summary_line(text_file: Path, tmp_path: Path):
    tiny = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.warmup_steps=2",
            "--data.block_size=32", "--data.batch_size=8", f"--data.cache_dir={text_file.parent}/c"]  # fmt: skip
    lines = run_benchmark("transfer.py", f"--data-path={text_file}", "--speakers", "KING ARTHUR", "LADY BEATRICE",
                          "--seeds", "1", "2", "--pretrain-steps=12", "--finetune-steps=6", "--scratch-val-every=6",
                          "--sample-tokens=8", "--prompt=KING ARTHUR:", "--threads=1", "--method", "full", "lora",
                          "--ranks", "2", "4", f"--plot-forgetting={tmp_path / 'forgetting.png'}", *tiny)  # fmt: skip
    loss = r"\d\.\d{3} ± \d\.\d{3}"
    for name in ("zero-shot", "fine-tuned", "LoRA r2", "LoRA r4", "scratch, equal steps", "scratch, equal steps, best",
                 "scratch, equal compute", "scratch, equal compute, best"):  # fmt: skip
        assert any(re.fullmatch(rf"\| {name} \| {loss} \| {loss} \|", line) for line in lines), name
    for name in ("before fine-tuning", "after fine-tuning", "after LoRA r2", "after LoRA r4"):
        assert any(re.fullmatch(rf"\| {name} \| {loss} \|", line) for line in lines), name
    # 1 layer of width 32: rank 2 on qkv (2 x (32 + 96)) and attn_proj (2 x (32 + 32)): 384 parameters.
    cost = r"\| LoRA r2 \| 384 \| [\d.,]+ kB \| [\d.]+ \| [\d,]+ MB \|"
    assert any(re.fullmatch(cost, line) for line in lines), [line for line in lines if "LoRA r2 |" in line]
    assert any(line.startswith("--- fine-tuned") for line in lines) and any(line == "--- LoRA r4" for line in lines)
    assert (tmp_path / "forgetting.png").stat().st_size > 0
    number = r"\d\.\d{4}"
    summary = rf"transfer: fine-tuned {number}, from scratch {number}, zero-shot {number} \(target val loss, mean"
    summary += r" of 2 seeds\)"
    assert re.fullmatch(summary, lines[-1]), lines[-1]


@pytest.mark.slow
def test_recipe_sweep_prints_the_table_and_the_chosen_recipe(text_file: Path):
    tiny = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.warmup_steps=2",
            "--data.block_size=32", "--data.batch_size=8", f"--data.path={text_file}",
            f"--data.cache_dir={text_file.parent}/c", "--trainer.limit_val_batches=2"]  # fmt: skip
    lines = run_benchmark("recipe_sweep.py", "--adamw-lrs", "1e-3", "--muon-lrs", "0.02", "--seeds", "1", "2",
                          "--steps=8", "--val-every=4", "--report-steps", "4", "8", "--budgets", "1000", "--threads=1",
                          *tiny)  # fmt: skip
    header = "| recipe | seeds | val @ 4 | val @ 8 | val within 1000 s | training time (s) |"
    table = lines[lines.index(header) + 2 :]
    loss = r"\d\.\d{3} ± \d\.\d{3}"
    assert re.fullmatch(rf"\| AdamW 0.001, 8 steps \| 2 \| {loss} \| {loss} \| {loss} \| [\d.]+ ± [\d.]+ \|", table[0])
    assert table[1].startswith("| Muon 0.02 + AdamW 0.001, 8 steps | 2 |")
    assert re.fullmatch(r"median training time per step: adamw [\d.]+ ms, muon [\d.]+ ms", lines[-2])
    assert re.fullmatch(r"recipe_sweep: lowest val/loss within .*: .*, \d\.\d{4} \(mean of 2 seeds, \d+ s\)", lines[-1])


def test_muon_step_benchmark_prints_a_row_per_optimizer():
    lines = run_benchmark("muon_step.py", "--rounds", "1", "--steps", "2", "--threads", "1", "--n-layer", "1",
                          "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch-size", "2")  # fmt: skip
    rows = [line for line in lines if line.startswith("| ") and "ms" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| AdamW", "| Muon bf16", "| Muon fp32"]
    assert rows[0].endswith("| 1.00x |")


@pytest.mark.slow
def test_gpt2_cpu_benchmark_prints_encoding_speeds_and_the_memory_table(tmp_path: Path):
    corpus = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text(make_play(300), encoding="utf-8")
    lines = run_benchmark("gpt2_cpu.py", f"--data-dir={tmp_path / 'data'}", "--copies=2", "--repeats=1",
                          "--parts", "encode", "memory")  # fmt: skip
    number = r"[\d,.]+"
    for way in (
        "characters",
        "BPE, one segment per call",
        "BPE, batches with offsets (before)",
        "BPE, batches of ids alone (now)",
    ):
        row = rf"\| {re.escape(way)} \| {number} \| {number} \| {number} \| {number}x \|"
        assert any(re.fullmatch(row, line) for line in lines), way
    assert any(
        line.startswith("| BPE, batches with offsets (before) |") and line.endswith("| 1.00x |") for line in lines
    )
    assert any(line.startswith("| gpt2 | 124.4M |") for line in lines)
    assert any(line.startswith("| gpt2-xl | 1,557.6M |") and line.endswith("| no | no |") for line in lines)


@pytest.mark.slow
def test_encode_memory_benchmark_prints_a_row_per_shape_of_text_and_its_ratio_to_lf(tmp_path: Path):
    corpus = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text(make_play(300), encoding="utf-8")
    lines = run_benchmark("encode_memory.py", f"--data-dir={tmp_path / 'data'}", "--size-mb=0.2", "--vocab-size=300")
    header = "| text | MB | tokens | s | at start (MB) | peak RSS (MB) | peak RSS per MB of text | ratio to LF |"
    rows = lines[lines.index(header) + 2 :]
    number = r"[\d,.]+"
    assert [row.split(" | ")[0] for row in rows] == ["| LF", "| CRLF", "| one line", "| indented"], lines
    assert all(re.fullmatch(rf"\| [\w ]+ \| 0\.\d \|( {number} \|){{6}}", row) for row in rows), rows
    assert rows[0].endswith("| 1.00 |")


@pytest.mark.slow
def test_serve_load_benchmark_prints_a_row_per_client_count_and_the_ratio(pretrained: Path):
    pytest.importorskip("litserve", reason="the serve extra installs LitServe")
    lines = run_benchmark("serve_load.py", f"--ckpt-path={pretrained / 'checkpoints' / 'last.ckpt'}", "--clients", "1",
                          "3", "--tokens=10", "--threads=1")  # fmt: skip
    number = r"[\d,.]+"
    for clients in (1, 3):
        row = rf"\| {clients} \| {number} \| {number} \| {number} \| {number} \| 0 \| {number} MB \|"
        assert any(re.fullmatch(row, line) for line in lines), lines
    assert re.fullmatch(rf"served total / generate alone, N=3: {number}", lines[-1]), lines[-1]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CORPUS.is_file(), reason="the built-in tasks need the corpus copy in ../shared/data")
def test_zero_shot_benchmark_prints_each_task_against_chance_and_the_curve_along_a_run(tmp_path: Path):
    lines = run_benchmark("zero_shot.py", f"--runs={tmp_path / 'runs'}", f"--data-dir={SHARED_DATA}",
                          "--presets", "cpu", "--seeds", "1", "2", "--max-steps=4", "--limit=8",
                          "--trainer.limit_val_batches=2", "--sample.every_n_validations=0")  # fmt: skip
    assert lines[0] == "zero-shot acc, mean ± sd over seeds 1, 2; chance 0.25; n items per task"
    for task in ("spelling", "next-word", "next-line", "who-speaks"):
        assert any(re.fullmatch(rf"{task}\s+8\s+[\d.]+ ± [\d.]+", line) for line in lines), lines
    header = next(k for k, line in enumerate(lines) if line.startswith(" step"))
    assert [line.split()[0] for line in lines[header + 1 :]] == [
        "1",
        "1",
        "2",
        "3",
        "4",
    ]  # one step, then 4 validations


@pytest.mark.slow
@pytest.mark.skipif(
    not SHARED_CORPUS.is_file(), reason="the sweep trains tokenizers on the corpus copy in ../shared/data"
)
def test_tokenizer_sweep_calibrates_trains_and_prints_a_row_and_a_sample_per_vocabulary(tmp_path: Path):
    tiny = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.warmup_steps=2",
            "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2"]  # fmt: skip
    args = [f"--runs={tmp_path / 'runs'}", f"--data-dir={SHARED_DATA}", "--vocab-sizes", "256", "--seeds", "1",
            "--char-steps=8", "--calibration-rounds=1", "--calibration-steps=3", "--calibration-warmup=1",
            "--sample-chars=20", f"--plot={tmp_path / 'sweep.png'}", *tiny]  # fmt: skip
    lines = run_benchmark("tokenizer_sweep.py", *args)
    assert lines[0].startswith("validation split: ") and lines[0].endswith(
        "(ASCII: bits per character = bits per byte)"
    )
    for label in ("char", "bpe-256"):  # one BPE: each vocabulary costs a fit and two samples in subprocesses
        calibrated = re.compile(rf"\s+{label}: +[\d.]+ ms/step, t_char/t = \d\.\d{{3}} -> (\d+) steps")
        assert any(calibrated.fullmatch(line) for line in lines), label
        row = rf"\| {label} \| [\d,]+ \| [\d,]+ \| \d+ \| \d\.\d\d \| \d\.\d{{3}} \| \d+\.\d{{3}} \| 1 \|"
        assert any(re.fullmatch(row, line) for line in lines), (label, lines)
        assert any(line.startswith(f"--- {label}, seed 1, ") for line in lines), label
    assert next(line for line in lines if line.startswith("| char |")).startswith("| char | 65 | ")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    again = run_benchmark("tokenizer_sweep.py", *args)  # finished runs and the calibration are reused
    assert "calibration reused from" in "\n".join(again) and not any(line.startswith("training ") for line in again)


def test_the_benchmarks_read_a_resumed_runs_event_files_in_the_order_they_were_written(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.plot_run import scalars

    # A run, then its resume from step 5, whose file names sort the other way round ("10" before "9"), as two
    # fits in one process and one second name them.
    for value, (first, last), name in ((1.0, (0, 10), "9"), (2.0, (5, 15), "10")):
        with SummaryWriter(str(tmp_path / "writing")) as writer:
            for step in range(first, last):
                writer.add_scalar("val/loss", value, step)
        [written] = (tmp_path / "writing").iterdir()
        written.rename(tmp_path / f"events.out.tfevents.1700000000.host.{name}.0")
    assert scalars(tmp_path)["val/loss"] == [(s, 1.0) for s in range(5)] + [(s, 2.0) for s in range(5, 15)]


def test_the_tasks_benchmark_plans_every_way_of_each_task_as_fits_the_cli_parses(capsys, monkeypatch, tmp_path: Path):
    import argparse

    from benchmarks import tasks

    monkeypatch.setattr(sys, "argv", ["main.py"])
    monkeypatch.setattr(tasks, "tokens_per_step", lambda *args: 700.0)  # the task data needs the corpus
    args = argparse.Namespace(tasks=["addition-2", "reverse-words"], seeds=[1, 2], steps=None, pretrain_steps=None)
    roots, compute = tasks.plan(args, "data", tmp_path, tmp_path / "plays.txt")
    runs = [run for root in roots for run in (root, *root.after)]
    assert tasks.finetune_steps(args) == 600 and compute["reverse-words"] == 600 + math.ceil(12 * 64 * 1200 / 700)
    expected = {f"pretrain-s{s}" for s in (1, 2)} | {
        f"{task}-{way}-s{s}" for task in args.tasks for way in tasks.WAYS for s in (1, 2)
        if not (way == "lora" and task in tasks.GROWS)
    }  # fmt: skip
    assert {run.name for run in runs} == expected
    for run in runs:
        with pytest.raises(SystemExit) as exit_info:
            GPTLightningCLI(args=["fit", *run.args, f"--trainer.max_steps={run.steps}", "--print_config"])
        assert exit_info.value.code == 0, f"{run.name}: {capsys.readouterr().err[-2000:]}"
        assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == run.steps
        grows = "--data.grow_vocab=true" in run.args
        assert grows == (run.name.startswith("addition-2-full")), run.name  # a pre-trained start on digits grows


@pytest.mark.slow
def test_gpu_report_smoke_prints_every_row_and_says_its_figures_are_not_measurements(text_file: Path, tmp_path: Path):
    lines = run_benchmark("gpu_report.py", "--smoke", f"--data-path={text_file}", "--threads=1",
                          f"--nanogpt={tmp_path / 'no-nanogpt'}", "--profile")  # fmt: skip
    assert "NOT measurements" in lines[0]
    assert any(line.endswith("git clone https://github.com/karpathy/nanoGPT benchmarks/.nanogpt") for line in lines)
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines if line.startswith("| ") and "`" in line}
    expected = [f"{preset}, compile {mode}" for preset in ("baby-gpt", "baby-gpt-muon")
                for mode in ("off", "true", "reduce-overhead")]  # fmt: skip
    expected += [
        "data path (baby-gpt plain loop, compile false)",
        "nanoGPT train.py, compile=True",
        "time to 10.0 (pretrain_muon shrunk, 1 seed)",
        "GPT-2 small shape, full (smoke: cpu preset's sizes)",
        "GPT-2 small shape, LoRA rank 8 (smoke: cpu preset's sizes)",
    ]
    assert list(rows) == expected, lines
    number = r"[\d,.]+"
    beside = rf"\| {number} \| — \| {number} \| {number} \| -?{number} ms \([+-]{number}%\) \| n/a \(CPU\) \|"
    for name in ("baby-gpt, compile off", "baby-gpt-muon, compile off"):  # fit beside the plain loop
        assert re.search(beside, rows[name]), rows[name]
        assert "python -m benchmarks.throughput --preset " in rows[name]
    assert "skipped in --smoke" in rows["baby-gpt, compile reduce-overhead"]
    assert "the data path adds" in rows["data path (baby-gpt plain loop, compile false)"]
    assert "skipped: no nanoGPT tree" in rows["nanoGPT train.py, compile=True"]
    assert re.search(r"seed 0: [\d.]+ s \(val/loss", rows["time to 10.0 (pretrain_muon shrunk, 1 seed)"])
    gpt2 = rows["GPT-2 small shape, LoRA rank 8 (smoke: cpu preset's sizes)"]
    assert "vocabulary 50,257" in gpt2 and "SYNTHETIC random token ids" in gpt2
    targets = lines.index("Issue 32's targets (set for one H200), on CPU (smoke: meaningless):")
    verdict = r"- .*: (met|MISSED) \(.*\)"
    assert all(re.fullmatch(verdict, line) for line in lines[targets + 1 : targets + 4]), lines[targets:]
    assert any(line.startswith("torch.profiler, 2 steps of the baby GPT's plain loop") for line in lines)


def test_gpu_report_runs_nanogpts_train_py_on_our_split_and_reads_its_iteration_lines(text_file: Path, tmp_path: Path):
    from benchmarks import gpu_report

    tree = tmp_path / "nanogpt"  # a stand-in for nanoGPT's train.py: records what it was given, prints its log lines
    tree.mkdir()
    (tree / "train.py").write_text(
        "import json, pickle, sys\nimport numpy as np\n"
        "args = dict(a[2:].split('=') for a in sys.argv[2:])\n"
        "meta = pickle.load(open(args['dataset'] + '/meta.pkl', 'rb'))\n"
        "ids = {s: np.fromfile(f\"{args['dataset']}/{s}.bin\", dtype=np.uint16).tolist() for s in ('train', 'val')}\n"
        "json.dump({'config': sys.argv[1], 'args': args, 'ids': ids, 'meta': meta}, open('seen.json', 'w'))\n"
        "for i in range(int(args['max_iters']) + 1):\n"
        "    print(f'iter {i}: loss {4 - i / 10:.4f}, time {1000 if i == 0 else 50 + i % 2:.2f}ms, mfu 0.50%')\n"
    )
    report = gpu_report.Report(gpu_report.parse_args(["--smoke", f"--data-path={text_file}", f"--nanogpt={tree}"]))
    row = gpu_report.nanogpt(report)
    assert row.ms_per_step == pytest.approx(50.5) and row.tokens_per_s == pytest.approx(12 * 64 / 0.0505), row
    assert row.result.startswith("loss 3.4000 at iter 6; median of 6 iterations from 1"), row.result
    assert row.ran.startswith(f"cd {tree} && python train.py config/train_shakespeare_char.py --dataset=")
    seen = json.loads((tree / "seen.json").read_text())
    text = text_file.read_text(encoding="utf-8")
    chars = sorted(set(text))  # nanoGPT's prepare.py: sorted characters, ids as uint16, the last 10% for validation
    assert seen["meta"] == {"vocab_size": len(chars), "itos": {str(i): c for i, c in enumerate(chars)},
                            "stoi": {c: i for i, c in enumerate(chars)}}  # fmt: skip
    ids = [chars.index(c) for c in text]
    split = int(len(text) * 0.9)
    assert seen["ids"] == {"train": ids[:split], "val": ids[split:]}
    assert seen["config"] == "config/train_shakespeare_char.py"
    expected = {"batch_size": "12", "block_size": "64", "n_layer": "4", "dropout": "0.0", "compile": "False"}
    assert expected.items() <= seen["args"].items()
