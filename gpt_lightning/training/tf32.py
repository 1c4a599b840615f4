"""TF32 matmuls on the GPUs that have them, wherever a GPTModule trains."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class TF32Matmuls(Callback):
    """On Ampere and newer, float32 matmuls run on TF32 tensor cores (fp32 range, 10-bit mantissa): a
    process-wide setting, made when a fit starts on such a GPU."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
            torch.set_float32_matmul_precision("high")
