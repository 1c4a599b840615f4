"""The non-finite loss guard: a callback that stops a run, on every rank alike, once a loss is NaN or infinite."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def is_logging_step(trainer: L.Trainer, step: int) -> bool:
    """Whether Lightning writes step metrics for the batches of optimizer step `step` (counted from 0).

    Lightning's own rule: every trainer.log_every_n_steps-th step, where step n - 1 is the first; 0
    never logs. Every step metric of ours uses this one function, so all of them land on the same steps. Ask
    before the step is taken. Each self.log call costs about 0.6 ms of Lightning bookkeeping even when nothing is
    written: logging every step cost the CPU recipe 7% of its throughput (docs/recipes-and-benchmarks.md)."""
    n: int = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's logger connector
    return n > 0 and (step + 1) % n == 0


class NonFiniteLossGuard(Callback):
    """Stops training with a NonFiniteLossError naming the first bad step and the last good checkpoint.

    Each micro-batch's loss is only kept here: testing it reads it back (a host-device sync), and even on a CPU
    the few tiny ops of a test cost 0.4% of a CPU-recipe step. The losses are tested together once per logging
    step, after its last micro-batch, and before every checkpoint: never write weights that came out of a NaN."""

    def __init__(self) -> None:
        self._unchecked: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last check
        self._first_bad_step: int | None = None
        self._window_step = -1  # the optimizer step the current micro-batch belongs to

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        self._window_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._unchecked.append((self._window_step, loss.detach()))
        if is_logging_step(trainer, self._window_step) and trainer.global_step > self._window_step:
            self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raises on every rank, with the same message, if any rank has seen a non-finite loss.

        All ranks call this at the same points (logging steps and saves), and the decision is reduced
        across them: a rank that stopped alone would leave the others waiting in the next all-reduce."""
        if self._first_bad_step is None and self._unchecked:
            steps, losses = zip(*self._unchecked, strict=True)
            self._unchecked.clear()
            finite = torch.isfinite(torch.stack(losses)).tolist()
            if not all(finite):
                self._first_bad_step = steps[finite.index(False)]
        first_bad = math.inf if self._first_bad_step is None else self._first_bad_step
        if trainer.world_size > 1:
            reduced = trainer.strategy.reduce(torch.tensor(float(first_bad), device=pl_module.device), reduce_op="min")
            first_bad = float(reduced.item())  # type: ignore[union-attr]
        if math.isinf(first_bad):
            return
        self._first_bad_step = int(first_bad)
        callbacks: list[Callback] = getattr(trainer, "callbacks", [])  # set in Trainer.__init__, untyped there
        saved = [getattr(cb, "last_path", None) or getattr(cb, "best_model_path", None) for cb in callbacks]
        last = next((str(path) for path in saved if path), None)
        where = f"The last good checkpoint is {last}; " if last else "No checkpoint was saved before it; "
        raise NonFiniteLossError(
            f"the training loss became NaN or infinite at step {self._first_bad_step}; training stopped "
            f"without saving it. {where}lower model.learning_rate or set trainer.gradient_clip_val, then start again."
        )
