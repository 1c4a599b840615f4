"""Optimizers built from torch.optim: Muon for the transformer's hidden matrices, AdamW for the rest,
stepped as one optimizer so that Lightning's automatic optimization (clipping, accumulation, mixed
precision, checkpoints) and one LR schedule drive both. Plain PyTorch: no Lightning here."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
from torch import nn


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


def hidden_matrices(blocks: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the transformer blocks (attention and MLP projections): what Muon
    orthogonalizes. Embeddings, the head, norms and biases are not hidden matrices."""
    return [p for p in blocks.parameters() if p.dim() == 2]
