"""Optimizers built from torch.optim: Muon for the transformer's hidden matrices, AdamW for the rest,
stepped as one optimizer so that Lightning's automatic optimization (clipping, accumulation, mixed
precision, checkpoints) and one LR schedule drive both; and that schedule, warm-up then cosine. Plain
PyTorch: no Lightning here."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Literal, get_args

import torch
from torch import nn

from gpt_lightning.model import GPT


class CombinedOptimizer(torch.optim.Optimizer):
    """Steps several optimizers, each over its own parameters, as one.

    Its param_groups are the children's own group dicts, so an LR scheduler (or a gradient scaler's
    unscale) that walks them acts on the children. Each parameter may belong to one child only. The
    state lives in the children; `state_dict` holds theirs, in order, and loads back into them.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        # Optimizer.__init__ appends the very dicts it is given and refuses a parameter in two groups.
        super().__init__([group for opt in optimizers for group in opt.param_groups], defaults={})
        # What reads `optimizer.state` (Lightning moving it off the GPU after fit, say) sees the children's.
        self.state = CombinedState(optimizers)  # type: ignore[assignment]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:  # Lightning's closure runs forward and backward: once, for all children
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(
                f"this optimizer state holds {len(saved) if isinstance(saved, list) else 'no'} optimizers' "
                f"states, expected {len(self.optimizers)}: it was saved with another model.optimizer setting."
            )
        for optimizer, state in zip(self.optimizers, saved, strict=True):
            optimizer.load_state_dict(state)
        # Loading gives each child new group dicts: share those.
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(o).__name__ for o in self.optimizers)})"


class CombinedState(MutableMapping[torch.Tensor, Any]):
    """The children's per-parameter states as one mapping: a parameter's entry lives in the child that
    optimizes it, and is read and written there."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def _owner(self, param: torch.Tensor) -> torch.optim.Optimizer:
        for optimizer in self.optimizers:
            if any(p is param for group in optimizer.param_groups for p in group["params"]):
                return optimizer
        raise KeyError(param)

    def __getitem__(self, param: torch.Tensor) -> Any:
        for optimizer in self.optimizers:
            if param in optimizer.state:
                return optimizer.state[param]
        raise KeyError(param)

    def __setitem__(self, param: torch.Tensor, value: Any) -> None:
        self._owner(param).state[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._owner(param).state[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (param for optimizer in self.optimizers for param in optimizer.state)

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self.optimizers)


OptimizerName = Literal["adamw", "muon"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
MuonPrecision = Literal["auto", "bf16", "fp32"]
MUON_PRECISIONS: tuple[str, ...] = get_args(MuonPrecision)
# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below which bfloat16 products take the slow path.
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: CUDA, or a CPU with AVX-512 BF16 or AMX
    (read from the CPU's feature flags; a cap on oneDNN's instruction set counts). Elsewhere, an AVX2 CPU
    say, PyTorch falls back to a kernel far slower than float32 (pytorch/pytorch#146508)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISAS_WITHOUT_BF16:
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", bool)() or getattr(cpu, "_is_amx_tile_supported", bool)())


def orthogonalize(grad: torch.Tensor, dtype: torch.dtype, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:  # fmt: skip
    """Newton-Schulz: the quintic iteration of torch.optim.Muon (Keller Jordan's), in `dtype`. With
    bfloat16 it is torch's, bit for bit; float32 is for CPUs without native bfloat16."""
    a, b, c = coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.to(dtype).T if tall else grad.to(dtype)  # (short side, long side)
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with its Newton-Schulz in float32 where bfloat16 is slow.

    With precision "bf16" each step is torch's own. With "fp32" it is the same update (Nesterov momentum,
    orthogonalization, decoupled weight decay, torch's learning-rate adjustment) with the iteration in
    float32. "auto" takes bf16 where it is native (`native_bf16`). The state is torch's either way, so a
    checkpoint moves between machines and precisions.
    """

    def __init__(self, params: Any, precision: MuonPrecision = "auto", **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if precision not in MUON_PRECISIONS:
            raise ValueError(f"Muon's precision must be one of {', '.join(MUON_PRECISIONS)}, got {precision!r}.")
        self.precision = precision
        self._resolved: str | None = None

    def resolved_precision(self) -> str:
        """bf16 or fp32: `precision`, with auto decided by where the parameters are (once)."""
        if self._resolved is None:
            device = next((p.device for group in self.param_groups for p in group["params"]), torch.device("cpu"))
            auto = "bf16" if native_bf16(device) else "fp32"
            self._resolved = auto if self.precision == "auto" else self.precision
        return self._resolved

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if self.resolved_precision() == "bf16":
            return super().step(closure)
        return self._step(closure, torch.float32)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None, dtype: torch.dtype) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalize(update, dtype, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning rate: the same update RMS across rectangular shapes."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def hidden_matrices(blocks: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the transformer blocks (attention and MLP projections): what Muon
    orthogonalizes. Embeddings, the head, norms and biases are not hidden matrices."""
    return [p for p in blocks.parameters() if p.dim() == 2]


@dataclasses.dataclass
class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then a cosine down to min_ratio at decay_steps, then flat.

    LambdaLR saves a callable object's attributes in its state_dict, so the schedule travels in the
    checkpoint: a resumed run continues the checkpoint's own horizon whatever max_steps it is given.
    `restretch` moves the horizon mid-run without a jump: from the step it is called at, a new cosine
    runs from the multiplier reached there down to min_ratio at the new horizon.
    """

    warmup_steps: int
    decay_steps: int
    min_ratio: float
    cosine_start: int | None = None  # the step the cosine starts at; None: at the end of the warm-up
    start_ratio: float = 1.0  # the multiplier at cosine_start

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        start = self.warmup_steps if self.cosine_start is None else self.cosine_start
        if step >= self.decay_steps:
            return self.min_ratio
        progress = (step - start) / max(1, self.decay_steps - start)
        return self.min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.start_ratio - self.min_ratio)

    def restretch(self, step: int, decay_steps: int) -> None:
        """From `step` on, decay from the current multiplier to min_ratio at `decay_steps` instead."""
        if step > self.warmup_steps:
            self.cosine_start, self.start_ratio = step, self(step)
        self.decay_steps = decay_steps


def build_optimizer(
    gpt: GPT,
    name: OptimizerName,
    learning_rate: float,
    betas: tuple[float, float],
    weight_decay: float,
    fused: bool,
    muon_learning_rate: float = 0.02,
    muon_momentum: float = 0.95,
    muon_precision: MuonPrecision = "auto",
) -> torch.optim.Optimizer:
    """AdamW for every parameter (nanoGPT), or `muon`: Muon for the 2-D weights inside the blocks and AdamW
    for the embeddings, the head, norms and biases, as one optimizer that one schedule drives. Weight decay
    applies to weight matrices and embeddings only (by Muon too)."""
    groups = gpt.parameter_groups(weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
    hidden = hidden_matrices(gpt.h)
    in_muon = {id(p) for p in hidden}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in in_muon]} for g in groups]
    adamw_groups = [{**g, "name": group} for g, group in zip(rest, ("adamw", "adamw_no_decay"), strict=True)]
    muon = Muon([{"params": hidden, "name": "muon"}], precision=muon_precision, lr=muon_learning_rate,
                weight_decay=weight_decay, momentum=muon_momentum)  # fmt: skip
    return CombinedOptimizer([muon, torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=betas, fused=fused)])


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer and LR schedule of a run (GPTModule's arguments of the same names, documented there),
    checked once: what `configure_optimizers` builds from. No defaults: GPTModule's signature is the one place
    that writes them."""

    name: OptimizerName
    learning_rate: float
    min_lr: float
    warmup_steps: int
    lr_decay_steps: int | None
    weight_decay: float
    betas: tuple[float, float]
    muon_learning_rate: float
    muon_momentum: float
    muon_precision: MuonPrecision

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}.")
        if self.muon_precision not in MUON_PRECISIONS:
            raise ValueError(
                f"model.muon_precision must be one of {', '.join(MUON_PRECISIONS)}, got {self.muon_precision!r}."
            )

    def build(self, gpt: GPT, fused: bool) -> torch.optim.Optimizer:
        """`build_optimizer` with these settings; `fused`: AdamW's one kernel for all parameters (CUDA)."""
        return build_optimizer(gpt, self.name, self.learning_rate, self.betas, self.weight_decay, fused,
                               self.muon_learning_rate, self.muon_momentum, self.muon_precision)  # fmt: skip

    def schedule(self, max_steps: int | None) -> WarmupCosine:
        """Warm-up, then a cosine to min_lr at lr_decay_steps, or, unset, at the trainer's `max_steps`."""
        decay_steps = self.lr_decay_steps if self.lr_decay_steps is not None else max_steps
        if decay_steps is None or decay_steps < 0:
            raise ValueError("set trainer.max_steps, or model.lr_decay_steps, so the LR schedule has an end.")
        return WarmupCosine(self.warmup_steps, decay_steps, min_ratio=self.min_lr / self.learning_rate)

    def restretch(self, schedule: WarmupCosine, step: int) -> None:
        """A resumed run keeps its checkpoint's horizon (`schedule`, restored), unless lr_decay_steps asks for
        another one, which then starts from the LR reached at `step`."""
        if self.lr_decay_steps is not None and self.lr_decay_steps != schedule.decay_steps:
            schedule.restretch(step, self.lr_decay_steps)


def muon_note(optimizer: torch.optim.Optimizer) -> str | None:
    """Where and in what precision Muon's Newton-Schulz runs, for the log; None for AdamW alone."""
    if not isinstance(optimizer, CombinedOptimizer):
        return None
    muon = optimizer.optimizers[0]
    assert isinstance(muon, Muon)
    device = next((p.device for group in muon.param_groups for p in group["params"]), torch.device("cpu"))
    precision = f"{muon.resolved_precision()} on {device.type} (model.muon_precision {muon.precision})"
    return f"Muon: Newton-Schulz in {precision}"


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One learning rate per schedule, not per parameter group (AdamW's two groups share theirs)."""
    if isinstance(optimizer, CombinedOptimizer):
        muon, adamw = optimizer.optimizers
        return {"train/lr": adamw.param_groups[0]["lr"], "train/lr_muon": muon.param_groups[0]["lr"]}
    return {"train/lr": optimizer.param_groups[0]["lr"]}


def clip_gradients(
    parameters: Iterator[nn.Parameter], clip_norm: Callable[[float], torch.Tensor], value: float | None, by: str | None
) -> torch.Tensor:
    """Clips gradients by their total norm (`by` "norm" or unset) or elementwise ("value") and returns the norm
    before clipping, which clipping by norm computes anyway (no extra pass). `clip_norm(max_norm)` clips the
    parameters' gradients by norm: torch's clip_grad_norm_, or a sharded model's own, which reduces the norm
    over ranks."""
    if by == "value":
        norm = clip_norm(math.inf)
        if value:
            torch.nn.utils.clip_grad_value_(list(parameters), value)
        return norm
    return clip_norm(value or math.inf)
