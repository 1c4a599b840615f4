"""No host-device sync on a step that logs nothing: a read of a tensor's value from Python (`.item()`, `.cpu()`,
`bool(tensor)`, printing, ...) waits on a GPU for every kernel queued before it, and a step that does one cannot
be queued ahead of the GPU. Counted on the CPU over a short CLI fit (tests.probe.CountHostReads); on a GPU,
torch.cuda.set_sync_debug_mode("error") makes any sync an error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_ok, scalars, tiny_fit

EVERY = 4  # trainer.log_every_n_steps


def reads_by_step(text_file: Path, runs: Path, *args: str) -> tuple[dict[int, list[str]], str]:
    """The reads of each step of a 12-step fit, and what it printed on stdout (the progress bar)."""
    probe = runs / "probe"
    result = tiny_fit(text_file, runs, "--trainer.max_steps=12", f"--trainer.log_every_n_steps={EVERY}",
                      "--trainer.val_check_interval=8", "--trainer.limit_val_batches=2",
                      f"--last_checkpoint.every_n_train_steps={EVERY}", "--progress_bar.refresh_rate=1",
                      "--trainer.callbacks+=tests.probe.CountHostReads", f"--trainer.callbacks.out_dir={probe}",
                      *args, in_process=True)  # fmt: skip
    assert_ok(result)
    reads: dict[int, list[str]] = {}
    for step, method, where in json.loads((probe / "reads0.json").read_text()):
        reads.setdefault(step, []).append(f"{method} at {where}")
    return reads, result.stdout


@pytest.mark.parametrize(
    "args",
    [["--model.optimizer=adamw"], ["--model.optimizer=muon", "--trainer.accumulate_grad_batches=2"]],
    ids=["adamw", "muon, 2 micro-batches"],
)
def test_a_step_that_logs_nothing_reads_no_tensor_back(tmp_path: Path, text_file: Path, args: list[str]):
    reads, printed = reads_by_step(text_file, tmp_path / "runs", *args)
    logging_steps = {step for step in range(12) if (step + 1) % EVERY == 0}  # Lightning's rule: 3, 7, 11
    assert logging_steps <= set(reads), "the probe saw no reads on logging steps: it counts nothing"
    quiet = {step: where for step, where in reads.items() if step >= 0 and step not in logging_steps}
    assert not quiet, "reads on steps that log nothing:\n" + "\n".join(
        f"step {step}: {line}" for step, lines in sorted(quiet.items()) for line in sorted(set(lines))
    )
    logged = scalars(tmp_path / "runs" / "run" / "version_0")["train/loss"]
    assert [step for step, _ in logged] == sorted(logging_steps)
    shown = re.findall(r"train/loss=([0-9.]+)", printed)  # the bar still shows the latest logged loss
    assert shown and float(shown[-1]) == pytest.approx(logged[-1][1], abs=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_step_that_logs_nothing_never_syncs_on_a_gpu(tmp_path: Path, text_file: Path, optimizer: str):
    precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    result = tiny_fit(text_file, tmp_path / "runs", "--trainer.accelerator=gpu", f"--trainer.precision={precision}",
                      f"--model.optimizer={optimizer}", "--trainer.max_steps=12",
                      f"--trainer.log_every_n_steps={EVERY}", "--trainer.val_check_interval=8",
                      f"--last_checkpoint.every_n_train_steps={EVERY}", "--progress_bar.refresh_rate=1",
                      "--trainer.callbacks+=tests.probe.SyncErrorOnQuietSteps", in_process=True)  # fmt: skip
    assert_ok(result)  # a sync on a quiet step raises "called a synchronizing CUDA operation"
