"""Training throughput of `Trainer.fit` against a hand-written PyTorch loop, on the same model and batches.

(a) fit:   the LightningModule, DataModule, callbacks and logger that `python main.py fit --config <recipe>`
           builds, through `Trainer.fit`.
(b) plain: the same GPT class, AdamW groups, schedule, clipping, precision and batches in a minimal loop.

Each round runs (a) and (b) one after the other in this process, alternating which goes first; the
table reports every round and the medians, and the last line is the ratio of the medians.

    python benchmarks/throughput.py --preset cpu --data-dir ../shared/data --threads 2
    python benchmarks/throughput.py --preset baby-gpt --device cuda --precision bf16-mixed --compile
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gpt_lightning.cli import GPTLightningCLI  # noqa: E402
from gpt_lightning.data import RandomWindows  # noqa: E402
from gpt_lightning.lit_model import warmup_cosine  # noqa: E402
from gpt_lightning.model import GPT  # noqa: E402

RECIPES = {
    "cpu": ["configs/pretrain_cpu.yaml"],
    "baby-gpt": ["configs/pretrain.yaml"],
    "gpt2-small": ["configs/pretrain.yaml", "configs/model/gpt2_small.yaml"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Wall time of optimizer steps warmup+1 .. warmup+steps, GPU work included."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step == self.warmup and not self.start:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step == self.warmup + self.steps and not self.end:
            sync(pl_module.device)
            self.end = time.perf_counter()


def build_cli(args: argparse.Namespace, log_dir: str) -> GPTLightningCLI:
    overrides = [
        f"--data.data_dir={args.data_dir}",
        f"--trainer.accelerator={args.device}",
        "--trainer.devices=1",
        f"--trainer.precision={args.precision}",
        f"--trainer.max_steps={args.warmup + args.steps}",
        f"--trainer.val_check_interval={args.warmup + args.steps + 1}",  # no validation inside the timing
        f"--trainer.logger.init_args.save_dir={log_dir}",
        f"--progress_bar.refresh_rate={args.progress_bar_refresh}",
        "--trainer.enable_model_summary=false",
        "--last_checkpoint.every_n_train_steps=0",
        f"--model.compile={str(args.compile).lower()}",
    ]
    if args.batch_size:
        overrides.append(f"--data.batch_size={args.batch_size}")
    configs = [arg for config in RECIPES[args.preset] for arg in ("--config", str(ROOT / config))]
    return GPTLightningCLI(args=[*configs, *overrides], run=False)


def run_fit(args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build_cli(args, log_dir)
        timer = StepTimer(args.warmup, args.steps)
        cli.trainer.callbacks.append(timer)
        with contextlib.redirect_stdout(sys.stderr):  # the progress bar; stdout keeps the table
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        tokens = args.steps * cli.datamodule.batch_size * cli.datamodule.block_size
        return tokens / (timer.end - timer.start)


def run_plain(args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build_cli(args, log_dir)  # the same configuration, used here only for its values
    data, module = cli.datamodule, cli.model
    device = torch.device("cuda" if args.device in ("cuda", "gpu") else "cpu")
    model = GPT(module.config).to(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.set_float32_matmul_precision("high")  # as the LightningModule does
    if args.compile:
        model.compile()
    optimizer = torch.optim.AdamW(
        model.parameter_groups(module.weight_decay),
        lr=module.learning_rate,
        betas=module.betas,
        fused=device.type == "cuda",
    )
    schedule = functools.partial(
        warmup_cosine,
        warmup_steps=module.warmup_steps,
        decay_steps=args.warmup + args.steps,
        min_ratio=module.min_lr / module.learning_rate,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data.setup("fit")
    assert data.train_tokens is not None
    batches = iter(RandomWindows(data.train_tokens, data.block_size, data.batch_size, data.seed))
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    autocast = (
        functools.partial(torch.autocast, device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext
    )
    model.train()
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return args.steps * data.batch_size * data.block_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(RECIPES), default="cpu", help="recipe whose model and data to use")
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed or 16-mixed")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (set it: 2 cores here)")
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved (fit, plain) rounds")
    parser.add_argument("--batch-size", type=int, default=0, help="override the recipe's batch size")
    parser.add_argument("--progress-bar-refresh", type=int, default=10, help="fit's bar redraw cadence; 0 hides it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fit_rates, plain_rates = [], []
    print(f"preset={args.preset} device={args.device} precision={args.precision} compile={args.compile} "
          f"threads={args.threads} steps={args.steps} warmup={args.warmup}")  # fmt: skip
    print(f"{'round':>5}  {'fit tok/s':>12}  {'plain tok/s':>12}  {'fit/plain':>9}")
    for i in range(args.rounds):
        # Alternate the order so neither side always runs on a warmer machine.
        if i % 2 == 0:
            fit_rates.append(run_fit(args))
            plain_rates.append(run_plain(args))
        else:
            plain_rates.append(run_plain(args))
            fit_rates.append(run_fit(args))
        ratio = fit_rates[-1] / plain_rates[-1]
        print(f"{i + 1:>5}  {fit_rates[-1]:>12,.0f}  {plain_rates[-1]:>12,.0f}  {ratio:>9.3f}")
    fit, plain = statistics.median(fit_rates), statistics.median(plain_rates)
    print(f"{'median':>5}  {fit:>12,.0f}  {plain:>12,.0f}  {fit / plain:>9.3f}")
    print(f"fit/plain tokens-per-second ratio: {fit / plain:.2f}")


if __name__ == "__main__":
    main()
