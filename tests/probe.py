"""A callback the subprocess tests add with --trainer.callbacks+=tests.probe.RecordRank: each rank writes
the batches it trained on and a digest of its final weights."""

import hashlib
import json
import os
import signal
import traceback
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


# Tensor methods that read a value back to Python: on a GPU each waits for the queue of kernels (a host-device
# sync). Printing a tensor reads it too.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__repr__",
              "__format__")  # fmt: skip


class CountHostReads(Callback):
    """Records every Python-side read of a tensor during training (HOST_READS) with the optimizer step under way
    (counted from 0; with gradient accumulation, the step its micro-batches build; -1 before the first), as
    `<out_dir>/reads.json`: [[step, method, the innermost frames, as "file:line < file:line ..."], ...].

    Two kinds of read are left out, as no sync on a GPU either: inside the data loader (host tensors, before
    they move to the device), and torch's optimizers reading the step counters they keep on the host
    (torch.optim.optimizer._get_value; a fused AdamW, the GPU's, reads none)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.reads: list[tuple[int, str, str]] = []
        self._step = -1
        self._originals: dict[str, object] = {}

    def _record(self, method: str) -> None:
        frames = traceback.extract_stack(limit=40)[:-2]  # without this method and the wrapper
        if any("torch/utils/data" in f.filename for f in frames) or frames[-1].name == "_get_value":
            return
        while len(frames) > 1 and "/torch/" in frames[-1].filename:  # from the caller of torch's own methods
            frames.pop()
        self.reads.append((self._step, method, " < ".join(f"{Path(f.filename).name}:{f.lineno}"
                                                          for f in frames[::-1][:8])))  # fmt: skip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in HOST_READS:
            original = self._originals[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self._record(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step = trainer.global_step

    def _uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"reads{trainer.global_rank}.json").write_text(json.dumps(self.reads))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._uninstall()


class SyncErrorOnQuietSteps(Callback):
    """On a GPU, makes any host-device sync an error (torch.cuda.set_sync_debug_mode) from the start of each step
    that logs nothing to the start of the next one: its hooks, Lightning's bookkeeping after it and the next
    batch's copy to the device. The first step (which creates the optimizer's state) is left alone."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        from gpt_lightning.training.module import is_logging_step

        step = trainer.global_step
        torch.cuda.set_sync_debug_mode("error" if step > 0 and not is_logging_step(trainer, step) else "default")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        torch.cuda.set_sync_debug_mode("default")
