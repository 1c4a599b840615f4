"""Dropout masks that a resumed run draws exactly as the uninterrupted run would have."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class SeededDropout(Callback):
    """Seeds the global RNG before each training micro-batch from (run seed, rank, step, micro-batch).

    Dropout (the model's, LoRA's on its low-rank path, any other) draws from the global RNG. Seeded this way, a
    resumed run draws exactly the masks the uninterrupted run would have, with no RNG state to save per rank,
    while every micro-batch of an accumulation window draws its own. A network without dropout is left alone."""

    def __init__(self) -> None:
        self._run_seed = 0
        self._has_dropout = False
        self._window_step, self._micro_batch = -1, 0  # the optimizer step being accumulated, and where in it

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_seed = torch.initial_seed()  # the run's seed_everything value
        # Every dropout layer of the network, whoever added it (LoRA adds its own), not a list of the settings.
        self._has_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in pl_module.modules())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step != self._window_step:  # the first micro-batch of an optimizer step
            self._window_step, self._micro_batch = trainer.global_step, 0
        else:
            self._micro_batch += 1
        if self._has_dropout:
            key = (self._run_seed, trainer.global_rank, trainer.global_step, self._micro_batch)
            torch.manual_seed(hash(key) & (2**63 - 1))
