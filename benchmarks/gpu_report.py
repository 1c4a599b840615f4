"""Issue 32's report: run once on one GPU, it prints one markdown table of everything the issue measures.

    python -m benchmarks.gpu_report --data-dir data --nanogpt benchmarks/.nanogpt    # on the GPU
    python -m benchmarks.gpu_report --smoke --data-path FILE                         # anywhere: the script runs

Rows, each with what it ran:
- baby GPT (configs/pretrain.yaml, and configs/pretrain_muon.yaml), bf16-mixed, with compile off (today's
  settings), `--model.compile true` and `--model.compile reduce-overhead`: `Trainer.fit` against a plain
  PyTorch loop of the same model and step, in turns in one process (benchmarks.throughput), so the gap is
  Lightning's per-step overhead.
- the data path: throughput's plain loop on its real batches (pinned, copied non_blocking) against the same
  loop on one batch kept on the device. Equal step times: the GPU never waits for data.
- nanoGPT's own train.py with compile=True on the same characters and split, when its tree is at --nanogpt.
- the wall time to full-validation loss 1.47 with configs/pretrain_muon.yaml, one process per seed
  (benchmarks.time_to_loss).
- GPT-2 small's shape at GPT-2's vocabulary (124M), full fine-tuning and LoRA rank 8, on random token ids
  (GPT-2's tokenizer cannot be downloaded here): the plain step of benchmarks.gpt2_cpu.
- the peak GPU memory of each row (torch.cuda.max_memory_allocated, reset between rows).

`--smoke` runs what a CPU can in seconds (tiny step counts, the cpu preset's sizes; torch.compile and
nanoGPT's compiled run are skipped) to check the script, not to measure anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import pickle
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks import throughput
from benchmarks.common import RECIPES, ROOT, child_env, module_command, recipe_files, recipe_model, recipe_settings
from benchmarks.gpt2_cpu import VOCAB, train_steps
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.training.callbacks import peak_flops
from gpt_lightning.training.datamodule import TextDataModule

NANOGPT_CLONE = "git clone https://github.com/karpathy/nanoGPT benchmarks/.nanogpt"
COMPILE_MODES = ("false", "true", "reduce-overhead")  # the setting of the H200 figures so far, then compiled
# The cpu preset's sizes, for --smoke: a fit of a few steps takes a second.
SMOKE_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}  # and no dropout
NANOGPT_LINE = re.compile(r"iter (\d+): loss ([\d.]+), time ([\d.]+) ?ms, mfu (-?[\d.]+)%")


@dataclasses.dataclass
class Row:
    name: str
    ran: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    ms_per_step: float | None = None
    plain_ms_per_step: float | None = None
    overhead: str = ""  # Lightning's, in ms and %
    overhead_fraction: float | None = None  # and as a fraction of the plain loop's step
    seconds: float | None = None  # the median time to the target loss
    peak_memory: str = ""
    result: str = ""

    def markdown(self) -> str:
        cells = [
            self.name,
            "—" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}",
            "—" if self.mfu is None else f"{self.mfu:.1%}",
            "—" if self.ms_per_step is None else f"{self.ms_per_step:.2f}",
            "—" if self.plain_ms_per_step is None else f"{self.plain_ms_per_step:.2f}",
            self.overhead or "—",
            self.peak_memory or "—",
            self.result or "—",
            f"`{self.ran}`",
        ]
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


HEADER = (
    "| row | tokens/s | MFU | ms/step | plain loop ms/step | Lightning overhead | peak GPU memory | result | ran |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


class Report:
    """The rows' shared settings: device, precision, step counts, the data, and the card's peak FLOP/s."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.smoke = args, args.smoke
        self.device = "cpu" if args.smoke else "cuda"
        self.precision = "32-true" if args.smoke else "bf16-mixed"
        self.peak = peak_flops(torch.device(self.device), torch.float32 if args.smoke else torch.bfloat16)
        self.data = ["--data-path", args.data_path] if args.data_path else ["--data-dir", args.data_dir]
        # --smoke shrinks every recipe to the cpu preset's sizes, in float32 on the CPU.
        self.shrink = [f"--model.{key}={SMOKE_SHAPE[key]}" for key in ("n_layer", "n_head", "n_embd")]
        self.shrink += [f"--data.{key}={SMOKE_SHAPE[key]}" for key in ("block_size", "batch_size")]
        self.shrink += ["--model.dropout=0"]
        self.shrink = self.shrink if args.smoke else []

    def mfu(self, tokens_per_s: float, flops_per_token: int) -> float | None:
        return tokens_per_s * flops_per_token / self.peak if self.peak else None

    def peak_memory(self) -> str:
        if self.device != "cuda":
            return "n/a (CPU)"
        return f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB"

    def throughput_argv(self, preset: str, compile_mode: str, *cli_args: str) -> list[str]:
        a = self.args
        return [
            "--preset", preset, "--device", self.device, "--precision", self.precision, "--compile", compile_mode,
            "--steps", str(a.steps), "--warmup", str(a.warmup), "--rounds", str(a.rounds),
            "--threads", str(a.threads), "--progress-bar-refresh", "0", *self.data, *self.shrink, *cli_args,
        ]  # fmt: skip


def command_text(module: str, argv: list[str]) -> str:
    return f"python -m {module} " + shlex.join(argv)


def fit_against_plain(report: Report, preset: str, compile_mode: str) -> Row:
    """(a) Trainer.fit against (b) the plain loop, in turns (benchmarks.throughput)."""
    name = f"{preset}, compile {'off' if compile_mode == 'false' else compile_mode}"
    argv = report.throughput_argv(preset, compile_mode)
    row = Row(name, command_text("benchmarks.throughput", argv))
    if report.smoke and compile_mode != "false":
        row.result = "skipped in --smoke: torch.compile on a CPU takes minutes"
        return row
    m = throughput.measure(throughput.parse_args(argv))
    fit_s, plain_s = statistics.median(m.fit), statistics.median(m.plain)
    row.tokens_per_s = m.tokens_per_step / fit_s
    row.mfu = report.mfu(row.tokens_per_s, m.flops_per_token)
    row.ms_per_step, row.plain_ms_per_step = 1000 * fit_s, 1000 * plain_s
    gap_ms = statistics.median(1000 * (f - p) for f, p in zip(m.fit, m.plain, strict=True))
    gap = statistics.median(f / p - 1 for f, p in zip(m.fit, m.plain, strict=True))
    row.overhead, row.overhead_fraction = f"{gap_ms:.2f} ms ({gap:+.1%})", gap
    plain_rate = m.tokens_per_step / plain_s
    plain_mfu = report.mfu(plain_rate, m.flops_per_token)
    row.result = f"plain loop {plain_rate:,.0f} tokens/s" + (f", MFU {plain_mfu:.1%}" if plain_mfu else "")
    row.result += f"; medians of {len(m.fit)} rounds of {report.args.steps} steps each side; the peak memory holds"
    row.result += " both sides' models"
    return row


def data_path(report: Report) -> Row:
    """Throughput's plain loop on its real batches (pinned, non_blocking) against the same loop reusing one
    batch already on the device, in turns."""
    a = report.args
    compile_mode = "false" if report.smoke else a.data_compile
    argv = report.throughput_argv("baby-gpt", compile_mode, "--data.pin_memory=true")
    args = throughput.parse_args(argv)
    row = Row(f"data path (baby-gpt plain loop, compile {compile_mode})",
              f"benchmarks.throughput.PlainLoop real batches against reuse_batch=True; {shlex.join(argv)}")  # fmt: skip
    with tempfile.TemporaryDirectory() as log_dir:
        cli = throughput.build_cli(args, log_dir)
        real, resident = throughput.PlainLoop(args, cli), throughput.PlainLoop(args, cli, reuse_batch=True)
        for loop in (real, resident):
            loop.run(a.warmup)  # compiling included
        real_s: list[float] = []
        resident_s: list[float] = []
        for i in range(a.rounds):  # in the order a b b a a b ..., as throughput's turns
            turns = (real, resident) if i % 2 == 0 else (resident, real)
            for loop in turns:
                (real_s if loop is real else resident_s).append(loop.run(a.steps) / a.steps)
        tokens = cli.datamodule.batch_size * cli.datamodule.block_size
        flops = cli.model.flops_per_token
    real_step, resident_step = statistics.median(real_s), statistics.median(resident_s)
    row.tokens_per_s = tokens / real_step
    row.mfu = report.mfu(row.tokens_per_s, flops)
    row.ms_per_step = 1000 * real_step
    gap_ms = statistics.median(1000 * (r - s) for r, s in zip(real_s, resident_s, strict=True))
    row.result = (f"one batch kept on the device: {1000 * resident_step:.2f} ms/step; the data path adds "
                  f"{gap_ms:.2f} ms/step ({real_step / resident_step - 1:+.1%}); two models on the device")  # fmt: skip
    return row


def baby_gpt(report: Report, vocab_size: int) -> tuple[GPTConfig, int]:
    """The baby GPT's shape (configs/pretrain.yaml; the cpu preset's sizes under --smoke) and batch size."""
    config = recipe_model("baby-gpt", vocab_size)
    batch_size = recipe_settings(recipe_files("baby-gpt"))["data"]["batch_size"]
    if report.smoke:
        shape = SMOKE_SHAPE
        config = dataclasses.replace(
            config, n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
            block_size=shape["block_size"], dropout=0.0,
        )  # fmt: skip
        batch_size = shape["batch_size"]
    return config, batch_size


def nanogpt_data(report: Report, folder: Path) -> int:
    """nanoGPT's shakespeare_char files (train.bin and val.bin of uint16 ids, meta.pkl with vocab_size, itos
    and stoi) of the same characters and split as ours, in `folder`; returns the vocabulary's size."""
    data = TextDataModule(data_dir=report.args.data_dir, path=report.args.data_path,
                                 cache_dir=str(folder / "token_cache"))  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    assert data.train_tokens is not None and data.val_tokens is not None
    for name, tokens in (("train.bin", data.train_tokens), ("val.bin", data.val_tokens)):
        tokens.numpy().astype(np.uint16).tofile(folder / name)
    vocab = data.vocab
    assert isinstance(vocab, str), "a character vocabulary"
    meta = {"vocab_size": len(vocab), "itos": dict(enumerate(vocab)), "stoi": {c: i for i, c in enumerate(vocab)}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return len(vocab)


def nanogpt(report: Report) -> Row:
    """nanoGPT's own train.py, its shakespeare_char config, with compile=True, on our data and model shape."""
    a = report.args
    tree = Path(a.nanogpt)
    if not (tree / "train.py").is_file():
        skipped = f"skipped: no nanoGPT tree at {tree}"
        return Row("nanoGPT train.py, compile=True", f"nothing: {NANOGPT_CLONE}", result=skipped)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config, batch_size = baby_gpt(report, nanogpt_data(report, folder))
        iters = a.nanogpt_iters
        # An absolute --dataset replaces nanoGPT's data/<dataset> (os.path.join); one eval, at iteration 0.
        # Its configurator checks each value's type against its default's: dropout must read as a float.
        argv = [
            "train.py", "config/train_shakespeare_char.py", f"--dataset={folder}", f"--out_dir={folder / 'out'}",
            f"--max_iters={iters}", f"--eval_interval={iters + 1}", "--eval_iters=20", "--log_interval=1",
            f"--n_layer={config.n_layer}", f"--n_head={config.n_head}", f"--n_embd={config.n_embd}",
            f"--block_size={config.block_size}", f"--batch_size={batch_size}", f"--dropout={float(config.dropout)}",
            f"--bias={config.bias}",
        ]  # fmt: skip
        if report.smoke:  # on the CPU, in float32, not compiled
            argv += ["--device=cpu", "--compile=False", "--dtype=float32"]
        else:
            argv.append("--compile=True")
        name = "nanoGPT train.py, compile=" + ("False (smoke)" if report.smoke else "True")
        row = Row(name, f"cd {tree} && python " + shlex.join(argv))
        result = subprocess.run([sys.executable, *argv], cwd=tree, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        row.result = f"FAILED (exit {result.returncode}): {last}"
        return row
    lines = [m for m in map(NANOGPT_LINE.search, result.stdout.splitlines()) if m]
    settled = [m for m in lines if int(m.group(1)) >= a.nanogpt_skip]  # the first compile and evaluate
    if not settled:
        row.result = f"FAILED: no 'iter N: ... time ... ms' lines after iteration {a.nanogpt_skip}"
        return row
    batch, block = batch_size, config.block_size
    step_s = statistics.median(float(m.group(3)) / 1000 for m in settled)
    row.ms_per_step = 1000 * step_s
    row.tokens_per_s = batch * block / step_s
    with torch.device("meta"):
        row.mfu = report.mfu(row.tokens_per_s, GPT(config).flops_per_token())
    final = settled[-1]
    row.result = (f"loss {float(final.group(2)):.4f} at iter {final.group(1)}; median of {len(settled)} iterations "
                  f"from {a.nanogpt_skip}; its own mfu {float(final.group(4)):.2f}% is of an A100's 312 TFLOP/s; "
                  "MFU here is ours, of this card")  # fmt: skip
    row.peak_memory = "not read (nanoGPT's process)"
    return row


def time_to_loss(report: Report) -> Row:
    """benchmarks.time_to_loss with configs/pretrain_muon.yaml, one fresh process per seed."""
    a = report.args
    target = a.smoke_target if report.smoke else a.target
    base = ["--preset", "baby-gpt-muon", "--target", str(target), *report.data]
    if report.smoke:
        base += ["--val-every=2", "--trainer.max_steps=4", "--trainer.precision=32-true", "--threads",
                 str(a.threads), *report.shrink]  # fmt: skip
    seeds = range(a.seeds)
    commands = [[*base, f"--seed_everything={s}", f"--data.seed={s}"] for s in seeds]
    seeds_text = f"{len(commands)} seed" + ("s" if len(commands) > 1 else "")
    row = Row(f"time to {target} (pretrain_muon{' shrunk' if report.smoke else ''}, {seeds_text})",
              command_text("benchmarks.time_to_loss", [*base, "--seed_everything=S", "--data.seed=S"]) +
              f" for S in {', '.join(map(str, seeds))}")  # fmt: skip
    times, rates, mfus, memories, results = [], [], [], [], []
    for seed, argv in zip(seeds, commands, strict=True):
        done = subprocess.run(module_command("benchmarks.time_to_loss", *argv), capture_output=True, text=True,
                              env=child_env())  # fmt: skip
        line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("time_to_loss:")), None)
        if line is None or done.returncode not in (0, 2):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"time_to_loss seed {seed} failed (exit {done.returncode}): {last}")
        rate = re.search(r"([\d,]+) tokens/s", line)
        mfu = re.search(r"MFU ([\d.]+)%", line)
        memory = re.search(r"peak GPU memory ([\d.]+) GB", line)
        rates += [float(rate.group(1).replace(",", ""))] if rate else []
        mfus += [float(mfu.group(1)) / 100] if mfu else []
        memories += [float(memory.group(1))] if memory else []
        reached = re.search(r"val/loss ([\d.]+) <= [\d.]+ at step (\d+) in ([\d.]+) s", line)
        if reached:
            times.append(float(reached.group(3)))
            loss, step, seconds = reached.groups()
            results.append(f"seed {seed}: {seconds} s (val/loss {loss} at step {step})")
        else:
            results.append(f"seed {seed}: not reached ({line.removeprefix('time_to_loss: ')})")
    row.tokens_per_s = statistics.median(rates) if rates else None
    row.mfu = statistics.median(mfus) if mfus else None
    row.peak_memory = f"{max(memories):.2f} GB (the most of the seeds)" if memories else "n/a (CPU)"
    row.seconds = statistics.median(times) if len(times) == len(commands) else None
    median = "" if row.seconds is None else f"median {row.seconds:.1f} s; "
    row.result = median + "; ".join(results)
    return row


def gpt2_shape(report: Report, method: str) -> Row:
    """GPT-2 small's shape at GPT-2's vocabulary: the plain step of benchmarks.gpt2_cpu on random ids."""
    a = report.args
    preset = "cpu" if report.smoke else "gpt2-small"
    config = recipe_model(preset, vocab_size=VOCAB)
    recipe = " + ".join(f"configs/{name}" for name in RECIPES[preset])
    config = dataclasses.replace(config, padded_vocab_size=50_304)  # as configs/finetune_gpt2.yaml pads it
    padding = "padded to 50,304"
    batch = 2 if report.smoke else recipe_settings(recipe_files("gpt2-small"))["data"]["batch_size"]
    compile_mode = "false" if report.smoke else a.gpt2_compile
    dtype = None if report.smoke else torch.bfloat16
    label = "full" if method == "full" else "LoRA rank 8"
    row = Row(
        f"GPT-2 small shape, {label}" + (" (smoke: cpu preset's sizes)" if report.smoke else ""),
        f"benchmarks.gpt2_cpu.train_steps: {recipe} at vocabulary "
        f"{VOCAB:,} ({padding}), batch {batch} x {config.block_size}, SYNTHETIC random token ids (no GPT-2 "
        f"tokenizer offline), AdamW, {'float32' if dtype is None else 'bf16 autocast'}, compile {compile_mode}, "
        f"{a.gpt2_steps} steps after one",
    )
    result = train_steps(config, method, a.gpt2_steps, batch, report.device, dtype, compile_mode)
    row.ms_per_step = 1000 * result["s/step"]
    row.tokens_per_s = batch * config.block_size / result["s/step"]
    row.mfu = report.mfu(row.tokens_per_s, int(result["flops/token"]))
    trainable, state = result["trainable"] / 1e6, result["optimizer bytes"] / 1e6
    row.result = f"{trainable:,.2f}M trainable parameters, AdamW state {state:,.0f} MB"
    return row


def targets(rows: dict[str, Row], target_loss: float) -> list[str]:
    """Issue 32's targets, met or missed and by how much, from the rows that ran."""
    lines = []

    def verdict(target: str, met: bool, value: str) -> None:
        lines.append(f"- {target}: {'met' if met else 'MISSED'} ({value})")

    for preset in ("baby-gpt", "baby-gpt-muon"):
        today = rows.get(f"{preset}, compile false")
        compiled = [r for m in COMPILE_MODES[1:] if (r := rows.get(f"{preset}, compile {m}")) and r.tokens_per_s]
        if today and today.tokens_per_s and compiled:
            best = max(compiled, key=lambda r: r.tokens_per_s or 0.0)
            ratio = (best.tokens_per_s or 0.0) / today.tokens_per_s
            verdict(f"{preset} at 2x today's tokens/s or more", ratio >= 2, f"{ratio:.2f}x, with {best.name}")
    for row in rows.values():
        if row.overhead_fraction is not None:
            verdict(f"{row.name}: Lightning within 5% of the plain loop", row.overhead_fraction <= 0.05,
                    f"{row.overhead_fraction:+.1%} per step")  # fmt: skip
    ttl = rows.get("time to loss")
    if ttl and ttl.seconds is not None:
        verdict(f"time to {target_loss} at most 15 s", ttl.seconds <= 15, f"median {ttl.seconds:.1f} s")
    gpt2 = rows.get("GPT-2 small shape, full")
    if gpt2 and gpt2.mfu is not None:
        verdict("GPT-2-small shape at 40% MFU or more", gpt2.mfu >= 0.40, f"{gpt2.mfu:.1%}")
    return lines


def profile(report: Report) -> str:
    """The top operators of the baby GPT's plain-loop steps (throughput's PlainLoop, compiled as the data row),
    by their own time on the device (the CPU under --smoke): what a step spends its time on."""
    a = report.args
    compile_mode = "false" if report.smoke else a.data_compile
    args = throughput.parse_args(report.throughput_argv("baby-gpt", compile_mode))
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if report.device == "cuda" else []
    with tempfile.TemporaryDirectory() as log_dir:
        loop = throughput.PlainLoop(args, throughput.build_cli(args, log_dir))
        loop.run(a.warmup)
        with torch.profiler.profile(activities=activities) as prof:
            loop.run(a.steps)
    key = "self_device_time_total" if report.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    return f"torch.profiler, {a.steps} steps of the baby GPT's plain loop, compile {compile_mode}, by {key}:\n{table}"


def run_row(report: Report, make: Callable[[], Row], name: str) -> Row:
    """One row, on a clean slate: torch.compile's caches emptied (each model compiles afresh, and never hits
    its recompile limit), the memory of earlier rows freed and the peak reset."""
    torch._dynamo.reset()
    gc.collect()
    if report.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"gpu_report: {name} ...", file=sys.stderr, flush=True)
    try:
        row = make()
    except Exception as err:  # one row's failure must not lose the others' figures
        row = Row(name, "see stderr", result=f"FAILED: {type(err).__name__}: {err}")
        print(f"gpu_report: {name} failed", file=sys.stderr)
        traceback.print_exc()
    if not row.peak_memory and (row.tokens_per_s is not None or row.ms_per_step is not None):
        row.peak_memory = report.peak_memory()
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--data-path", help="a text file to train on instead of the corpus")
    parser.add_argument("--nanogpt", default=str(ROOT / "benchmarks" / ".nanogpt"), help="a nanoGPT checkout")
    parser.add_argument("--smoke", action="store_true", help="check the script runs (CPU, tiny): no measurements")
    parser.add_argument("--profile", action="store_true", help="then print the top operators of a baby GPT step")
    parser.add_argument("--rows", nargs="+", choices=["baby", "muon", "data", "nanogpt", "ttl", "gpt2"],
                        default=["baby", "muon", "data", "nanogpt", "ttl", "gpt2"], help="the rows to run")  # fmt: skip
    parser.add_argument("--steps", type=int, help="optimizer steps per turn (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps of each side, compiling included (20; smoke 1)")
    parser.add_argument("--rounds", type=int, help="rounds of turns (10; smoke 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (smoke)")
    parser.add_argument("--data-compile", default="reduce-overhead", help="the data-path row's model.compile")
    parser.add_argument("--nanogpt-iters", type=int, help="nanoGPT's max_iters (default 200; smoke 6)")
    parser.add_argument("--nanogpt-skip", type=int, help="nanoGPT iterations left out, compiling (10; smoke 1)")
    parser.add_argument("--target", type=float, default=1.47, help="full-validation loss to reach")
    parser.add_argument("--smoke-target", type=float, default=10.0, help="the smoke run's target: any loss")
    parser.add_argument("--seeds", type=int, help="time-to-loss seeds (default 3; smoke 1)")
    parser.add_argument("--gpt2-steps", type=int, help="timed GPT-2-shape steps (default 20; smoke 2)")
    parser.add_argument("--gpt2-compile", default="true", help="the GPT-2-shape rows' compile (false, true, a mode)")
    args = parser.parse_args(argv)
    defaults = {"steps": (20, 2), "warmup": (20, 1), "rounds": (10, 2), "nanogpt_iters": (200, 6),
                "nanogpt_skip": (10, 1), "seeds": (3, 1), "gpt2_steps": (20, 2)}  # fmt: skip
    for name, (gpu, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else gpu)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_report measures a GPU, and torch sees none. To check the script on a CPU: --smoke.")
    torch.set_num_threads(args.threads)
    report = Report(args)
    card = "CPU" if report.device == "cpu" else torch.cuda.get_device_name()
    if args.smoke:
        print("SMOKE RUN: tiny step counts and the cpu preset's sizes on the CPU, compile off. These figures are "
              "NOT measurements; they only show that every row runs.")  # fmt: skip
    print(f"gpu_report on {card}, torch {torch.__version__}, precision {report.precision}, peak "
          f"{'n/a' if report.peak is None else f'{report.peak / 1e12:,.1f} TFLOP/s'} for MFU\n")  # fmt: skip
    if "nanogpt" in args.rows and not (Path(args.nanogpt) / "train.py").is_file():
        print(f"nanoGPT: no tree at {args.nanogpt}; to compare with it: {NANOGPT_CLONE}\n")
    print(HEADER, flush=True)
    plan: list[tuple[str, str, Callable[[], Row]]] = []
    for key, preset in (("baby", "baby-gpt"), ("muon", "baby-gpt-muon")):
        for mode in COMPILE_MODES:
            plan.append((key, f"{preset}, compile {mode}", functools.partial(fit_against_plain, report, preset, mode)))
    plan += [
        ("data", "data path", functools.partial(data_path, report)),
        ("nanogpt", "nanoGPT", functools.partial(nanogpt, report)),
        ("ttl", "time to loss", functools.partial(time_to_loss, report)),
        ("gpt2", "GPT-2 small shape, full", functools.partial(gpt2_shape, report, "full")),
        ("gpt2", "GPT-2 small shape, LoRA", functools.partial(gpt2_shape, report, "lora")),
    ]
    rows: dict[str, Row] = {}
    for key, name, make in plan:
        if key in args.rows:
            rows[name] = run_row(report, make, name)
            print(rows[name].markdown(), flush=True)
    print(f"\nIssue 32's targets (set for one H200), on {card}" + (" (smoke: meaningless)" if args.smoke else "") + ":")
    print("\n".join(targets(rows, args.smoke_target if args.smoke else args.target)) or "- no row to judge")
    if args.profile:
        print("\n" + profile(report))
    if any(row.result.startswith("FAILED") for row in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
