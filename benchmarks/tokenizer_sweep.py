"""Which tokenizer is best for tiny Shakespeare at a fixed budget: characters against byte-level BPEs of
256 to 4,096 tokens, with the CPU recipe's model (its embedding grows with the vocabulary) trained for the
CPU recipe's wall time, 3 seeds each (docs/tokenizers.md).

    python -m benchmarks.tokenizer_sweep --runs runs/tokenizer_sweep --data-dir ../shared/data \
        --plot docs/tokenizer_sweep.png

1. Tokenizers: the project's trainer (`train_tokenizer`) on the training split only, so the validation split
   stays unseen by the tokenizer too; no special tokens.
2. Calibration: a few dozen training steps of each vocabulary's run, interleaved in rounds in this process on
   one thread, through the project's own CLI. Each BPE run gets round(char steps x t_char / t_bpe) steps, so
   that it trains as long as the character run. Written to <runs>/calibration.json and reused by a rerun.
3. Runs: `main.py fit` with OMP_NUM_THREADS=1, every vocabulary with the first seed, then the next seed; a
   run that finished is reused, a partial one is trained again.
4. Report: bytes per token of the validation split, the final full validation's bits per byte (from
   val/bpc, scaled by the split's characters per byte, 1 for ASCII), a `generate` sample of each first-seed
   model, a table and a plot.

With BPE, a step sees block_size tokens, so more bytes: that is the comparison. Options after the known ones
go to every fit and to the calibration, e.g. `--model.n_layer=1` for a tiny check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    ROOT,
    callbacks_of,
    child_env,
    config_args,
    recipe_cli,
    recipe_files,
    recipe_settings,
    scalars,
)
from gpt_lightning.data.corpus import atomic_write_bytes
from gpt_lightning.tokenizer import BPETokenizer
from gpt_lightning.tokenizer_training import Compression, measure, select_text, train_tokenizer

CHAR = "char"


class StepTimes(Callback):
    """The wall time of each training step after the first `skip` (the first ones warm caches up)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.times: list[float] = []
        self.seconds: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > self.skip + 1:
            self.seconds.append(self.times[-1] - self.times[-2])


@dataclass(frozen=True)
class Vocabulary:
    label: str  # char, or bpe-<vocab size asked>
    tokenizer: Path | None  # the tokenizer.json; None for characters

    def data_args(self) -> list[str]:
        return [] if self.tokenizer is None else [f"--data.tokenizer={self.tokenizer}"]


def common_args(data_dir: str, runs: Path, extra: list[str]) -> list[str]:
    return [*config_args(recipe_files("cpu")), f"--data.data_dir={data_dir}", f"--data.cache_dir={runs / 'cache'}",
            "--progress_bar.refresh_rate=0", *extra]  # fmt: skip


def tokenizers(vocab_sizes: list[int], data_dir: str, runs: Path) -> list[Vocabulary]:
    """Characters, then a BPE per size trained on the training split (an existing tokenizer.json is reused:
    the trainer is deterministic)."""
    vocabularies = [Vocabulary(CHAR, None)]
    for size in vocab_sizes:
        output = runs / "tokenizers" / f"bpe-{size}.json"
        if not output.is_file():
            output.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.redirect_stdout(sys.stderr):  # stdout keeps the tables
                train_tokenizer(str(output), data_dir=data_dir, text_span=None, include_validation=False,
                                vocab_size=size, special_tokens=())  # fmt: skip
        vocabularies.append(Vocabulary(f"bpe-{size}", output))
    return vocabularies


def calibrate(vocabularies: list[Vocabulary], args: argparse.Namespace, base: list[str]) -> dict[str, dict]:
    """{label: seconds per step, parameters, vocab size}, timed side by side: each round times every
    vocabulary's steps in turn, and a vocabulary's time is the median of all its steps."""
    seconds: dict[str, list[float]] = {v.label: [] for v in vocabularies}
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # 18 fits' banners would bury the figures
    shape: dict[str, dict] = {}
    for round_ in range(args.calibration_rounds):
        for vocabulary in vocabularies:
            timer = StepTimes(skip=args.calibration_warmup)
            with tempfile.TemporaryDirectory() as tmp:
                cli = recipe_cli([*base, *vocabulary.data_args(),
                                  f"--trainer.max_steps={args.calibration_warmup + 1 + args.calibration_steps}",
                                  f"--trainer.logger.init_args.save_dir={tmp}", "--trainer.limit_val_batches=0",
                                  "--trainer.num_sanity_val_steps=0", "--trainer.enable_model_summary=false",
                                  "--sample.every_n_validations=0", "--last_checkpoint.every_n_train_steps=0",
                                  "--checkpoint.save_top_k=0"])  # fmt: skip
                callbacks_of(cli.trainer).append(timer)
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            seconds[vocabulary.label] += timer.seconds
            gpt = cli.model.gpt
            shape[vocabulary.label] = {"parameters": gpt.num_parameters(), "vocab_size": gpt.config.vocab_size}
            print(f"  calibration round {round_ + 1}, {vocabulary.label}: "
                  f"{statistics.median(timer.seconds) * 1000:.1f} ms/step", file=sys.stderr, flush=True)  # fmt: skip
    return {label: {**shape[label], "seconds_per_step": statistics.median(s)} for label, s in seconds.items()}


def calibration(vocabularies: list[Vocabulary], args: argparse.Namespace, base: list[str], runs: Path) -> dict:
    """The calibration and each vocabulary's steps, measured once and kept in <runs>/calibration.json: a rerun
    with the same settings reuses them, and with them its finished runs."""
    key = {"vocabularies": [v.label for v in vocabularies], "char_steps": args.char_steps, "fit_args": base}
    saved = runs / "calibration.json"
    if saved.is_file() and (found := json.loads(saved.read_text()))["key"] == key:
        print(f"calibration reused from {saved}", flush=True)
        return found
    measured = calibrate(vocabularies, args, base)
    t_char = measured[CHAR]["seconds_per_step"]
    for entry in measured.values():
        entry["steps"] = round(args.char_steps * t_char / entry["seconds_per_step"])
    result = {"key": key, "threads": torch.get_num_threads(), "vocabularies": measured}
    atomic_write_bytes(saved, json.dumps(result, indent=1).encode())
    return result


def run_dir(runs: Path, label: str, seed: int) -> Path:
    return runs / f"{label}-s{seed}" / "version_0"


def finished_step(run: Path) -> int | None:
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])


def train(vocabulary: Vocabulary, seed: int, steps: int, runs: Path, base: list[str]) -> Path:
    """The run folder of `vocabulary` trained for `steps` with `seed` (init and data order); a finished run is
    reused, a partial one (a crash, a kill) is removed and trained again."""
    name = f"{vocabulary.label}-s{seed}"
    run = run_dir(runs, vocabulary.label, seed)
    if finished_step(run) == steps:
        return run
    if (runs / name).exists():
        print(f"{name}: a partial run (step {finished_step(run)} of {steps}), trained again", flush=True)
        shutil.rmtree(runs / name)
    command = [sys.executable, str(ROOT / "main.py"), "fit", *base, *vocabulary.data_args(),
               f"--seed_everything={seed}", f"--data.seed={seed}", f"--trainer.max_steps={steps}",
               f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.logger.init_args.name={name}"]  # fmt: skip
    print(f"training {name} for {steps} steps", flush=True)
    started = time.perf_counter()
    log = runs / f"{name}.log"
    with log.open("w") as out:
        result = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=runs, env=child_env(OMP_NUM_THREADS="1")
        )
    if result.returncode != 0 or finished_step(run) != steps:
        raise SystemExit(f"{name} failed (exit {result.returncode}); its output: {log}")
    print(f"  {name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return run


def sample(run: Path, tokens: int) -> str:
    """What `main.py generate --seed 1` writes from the run's last.ckpt."""
    command = [sys.executable, str(ROOT / "main.py"), "generate", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
               "--seed=1", f"--max_new_tokens={tokens}"]  # fmt: skip
    return subprocess.run(
        command, check=True, capture_output=True, text=True, env=child_env(OMP_NUM_THREADS="1")
    ).stdout


def validation_compression(vocabularies: list[Vocabulary], data_dir: str) -> dict[str, Compression]:
    """Bytes and characters per token of the held-out text (the split train_tokenizer leaves out)."""
    text = select_text(data_dir=data_dir)
    return {v.label: measure(text.pieces("val"), "val", None if v.tokenizer is None else
                             BPETokenizer.from_file(v.tokenizer))[0] for v in vocabularies}  # fmt: skip


def mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{sd}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/tokenizer_sweep"), help="where the runs go (reused)")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--char-steps", type=int, help="the character run's steps (default: the CPU recipe's)")
    parser.add_argument("--calibration-rounds", type=int, default=3)
    parser.add_argument("--calibration-steps", type=int, default=30, help="timed steps per vocabulary and round")
    parser.add_argument("--calibration-warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--sample-chars", type=int, default=200, help="about this many characters per sample")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--plot", type=Path, help="write bits per byte against vocabulary size here")
    args, extra = parser.parse_known_args()
    torch.set_num_threads(1)
    args.char_steps = args.char_steps or int(recipe_settings(recipe_files("cpu"))["trainer"]["max_steps"])
    runs = args.runs.absolute()
    runs.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).absolute())
    base = common_args(data_dir, runs, extra)

    vocabularies = tokenizers(args.vocab_sizes, data_dir, runs)
    compression = validation_compression(vocabularies, data_dir)
    val = compression[CHAR]
    ascii_note = "ASCII: bits per character = bits per byte" if val.bytes == val.characters else "not ASCII"
    print(f"validation split: {val.characters:,} characters, {val.bytes:,} bytes ({ascii_note})", flush=True)
    if args.report_only and not (runs / "calibration.json").is_file():
        raise SystemExit(f"{runs} has no calibration.json: run without --report-only first.")
    calibrated = calibration(vocabularies, args, base, runs)["vocabularies"]
    t_char = calibrated[CHAR]["seconds_per_step"]
    print(f"calibration (side by side, 1 thread, median of {args.calibration_rounds} x {args.calibration_steps} "
          "steps each):")  # fmt: skip
    for v in vocabularies:
        entry = calibrated[v.label]
        print(f"  {v.label:>9}: {entry['seconds_per_step'] * 1000:6.1f} ms/step, t_char/t = "
              f"{t_char / entry['seconds_per_step']:.3f} -> {entry['steps']} steps")  # fmt: skip

    if not args.report_only:
        for seed in args.seeds:  # every vocabulary once before any gets a second seed: a partial sweep compares
            for v in vocabularies:
                train(v, seed, calibrated[v.label]["steps"], runs, base)

    rows, samples = [], []
    for v in vocabularies:
        entry, c = calibrated[v.label], compression[v.label]
        finished = [run_dir(runs, v.label, s) for s in args.seeds]
        finished = [r for r in finished if finished_step(r) == entry["steps"]]
        logged = [scalars(r) for r in finished]
        bpb = [m["val/bpc"][-1][1] * c.characters / c.bytes for m in logged]
        loss = [m["val/loss"][-1][1] for m in logged]
        check = [x / math.log(2) / c.bytes_per_token for x in loss]  # nats per token -> bits per byte
        rows.append((v, entry, c, bpb, loss, check, len(finished)))
        if finished and finished[0] == run_dir(runs, v.label, args.seeds[0]):
            tokens = max(1, round(args.sample_chars / c.characters_per_token))
            samples.append((v.label, tokens, sample(finished[0], tokens)))

    header = (
        "tokenizer | vocab | parameters | steps | bytes/token (val) | val loss (nats/token) | val bits/byte | seeds"
    )
    print(f"\n| {header} |")
    print("|---|---|---|---|---|---|---|---|")
    for v, entry, c, bpb, loss, _, n in rows:
        print(f"| {v.label} | {entry['vocab_size']:,} | {entry['parameters']:,} | {entry['steps']} | "
              f"{c.bytes_per_token:.2f} | {mean_sd(loss)} | {mean_sd(bpb)} | {n} |")  # fmt: skip
    print("\ncheck, val/loss / ln 2 / bytes per token of the split: "
          + ", ".join(f"{v.label} {mean_sd(check)}" for v, *_, check, _ in rows))  # fmt: skip
    for label, tokens, text in samples:
        print(f"\n--- {label}, seed {args.seeds[0]}, {tokens} tokens (generate --seed 1)\n{text.rstrip()}")
    if args.plot:
        plot([(entry["vocab_size"], v.label, bpb) for v, entry, _, bpb, *_ in rows if bpb], args.plot)
        print(f"\nwrote {args.plot}")


def plot(points: list[tuple[int, str, list[float]]], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.8), dpi=120)
    for size, label, bpb in points:
        sd = statistics.stdev(bpb) if len(bpb) > 1 else 0.0
        axes.errorbar(size, statistics.fmean(bpb), yerr=sd, marker="o" if label == CHAR else "s", capsize=3,
                      color="tab:orange" if label == CHAR else "tab:blue")  # fmt: skip
        axes.annotate("characters" if label == CHAR else f"BPE {size}", (size, statistics.fmean(bpb)),
                      textcoords="offset points", xytext=(6, 6), fontsize=8)  # fmt: skip
    bpe = [(size, statistics.fmean(bpb)) for size, label, bpb in points if label != CHAR]
    if bpe:
        axes.plot(*zip(*bpe, strict=True), color="tab:blue", linewidth=1)
    axes.set_xscale("log", base=2)
    axes.set_xticks([size for size, *_ in points], [str(size) for size, *_ in points])
    axes.minorticks_off()
    axes.set_xlabel("vocabulary size (tokens, log scale)")
    axes.set_ylabel("validation bits per byte")
    axes.set_title("Tiny Shakespeare at the CPU recipe's wall time (mean ± sd over seeds)")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)


if __name__ == "__main__":
    main()
