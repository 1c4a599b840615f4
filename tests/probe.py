"""A callback the subprocess tests add with --trainer.callbacks+=tests.probe.RecordRank: each rank writes
the batches it trained on and a digest of its final weights."""

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class RecordRank(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[list[int]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.batches.append(batch[0][:, 0].tolist())  # first token of each window identifies the batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())  # this rank's own loss

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "batches": self.batches, "losses": self.losses,
                  "weights": digest.hexdigest()}  # fmt: skip
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class PoisonWeights(Callback):
    """Makes the loss NaN from step `at_step` on by writing a NaN into the token embedding (of one rank's
    copy only, when `rank` is given)."""

    def __init__(self, at_step: int, rank: int | None = None) -> None:
        self.at_step = at_step
        self.rank = rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at_step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                pl_module.gpt.wte.weight[0, 0] = float("nan")


class StopAfterBatch(Callback):
    """Sends `signal` to this process after the training batch with index `batch` (counted from 0 over the
    whole run, micro-batches included) has run: on every rank, or on rank `rank` only."""

    def __init__(self, batch: int, signal: str = "SIGTERM", rank: int | None = None) -> None:
        self.batch = batch
        self.signal = signal
        self.rank = rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal))


class CrashAtStep(Callback):
    """Raises a RuntimeError (a crash that saves nothing) when optimizer step `step` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


class OpaqueState(Callback):
    """A callback whose state is an object, not plain data: `weights_only` loads refuse it."""

    def state_dict(self) -> dict:
        return {"opaque": OpaqueState}


class KillAfterLoggingStep(Callback):
    """SIGKILLs this process the moment Lightning has handed the logger the metrics of optimizer step
    `step` (counted from 1: the step that leaves global_step at `step`), which it does after every
    on_train_batch_end hook, last.ckpt's save included: no time for a background writer to catch up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        logger = trainer.logger
        log_metrics = logger.log_metrics

        def log_then_die(metrics, step=None):
            log_metrics(metrics, step)
            if "train/loss" in metrics:  # Lightning's own call (callbacks such as TokenThroughput log too)
                os.kill(os.getpid(), signal.SIGKILL)

        logger.log_metrics = log_then_die


class KillAtStep(Callback):
    """SIGKILLs this process when optimizer step `step` (counted from 0) starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
