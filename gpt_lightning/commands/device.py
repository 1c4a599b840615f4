"""Where a command runs its model: an accelerator and a precision, named as fit's `--trainer` options so that
`--trainer.accelerator gpu` and `--trainer.precision bf16-mixed` mean the same in every command. Plain torch."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from gpt_lightning.model import GPT

log = logging.getLogger(__name__)

Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]
Precision = Literal["32-true", "64-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed"]
DTYPES = {"64": torch.float64, "32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}


def synchronize(device: torch.device | str) -> None:
    """Waits for the device's queued work, so that a timer reads when it is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Device:
    """One device to run a model on.

    Args:
        accelerator: cpu, cuda, mps, gpu (CUDA or MPS, whichever this machine has) or auto (a GPU when there
            is one, else the CPU), as fit's --trainer.accelerator.
        devices: How many devices: commands run on one.
    """

    accelerator: Accelerator = "auto"
    devices: int = 1

    def __post_init__(self) -> None:
        if self.devices != 1:
            raise ValueError(f"commands other than fit and validate run on one device: pass --trainer.devices 1, "
                             f"not {self.devices}.")  # fmt: skip

    def torch_device(self) -> torch.device:
        """The device `accelerator` names on this machine; a GPU asked for and absent is an error."""
        cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
        if self.accelerator == "cpu" or (self.accelerator == "auto" and not (cuda or mps)):
            return torch.device("cpu")
        if self.accelerator in ("cuda", "gpu", "auto") and cuda:
            return torch.device("cuda", torch.cuda.current_device())
        if self.accelerator in ("mps", "gpu", "auto") and mps:
            return torch.device("mps")
        raise ValueError(f"--trainer.accelerator {self.accelerator}: this machine has no such device; pass "
                         "--trainer.accelerator cpu (or auto, which takes a GPU when there is one).")  # fmt: skip


@dataclass(frozen=True)
class DeviceAndPrecision(Device):
    """One device to run a model on, and the precision to run it in.

    Args:
        precision: As fit's --trainer.precision: a "-true" precision casts the weights (and so the KV cache)
            to that type; a "-mixed" one keeps them in float32 and runs the forward pass under autocast.
    """

    precision: Precision = "32-true"

    def place(self, model: GPT) -> tuple[GPT, contextlib.AbstractContextManager[None]]:
        """The model on the device in this precision, and the context to run its forward passes in."""
        device = self.torch_device()
        bits, kind = self.precision.split("-")
        if kind == "true":
            return model.to(device=device, dtype=DTYPES[bits]), contextlib.nullcontext()
        if bits == "16" and device.type == "cpu":
            log.info("16-mixed: AMP with float16 is not supported on the CPU; bf16-mixed is used instead.")
            bits = "bf16"
        return model.to(device), _autocast(device, DTYPES[bits])


# Defaults for signatures (frozen, so shared safely): a GPU when there is one, in float32.
AUTO = Device()
AUTO_FLOAT32 = DeviceAndPrecision()


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    with torch.autocast(device.type, dtype=dtype):
        yield
