"""LoRA (Hu et al., 2021): fine-tune a frozen GPT through low-rank updates of its projections. Plain PyTorch.

A projection W (out, in) becomes W + (alpha / r) B A, with A (r, in) and B (out, r). Only A and B train:
for rank 8 on GPT-2 small's attention that is 0.44M parameters instead of 124M, and AdamW keeps its two
moments for those alone. B starts at zero, so at step 0 the model is exactly the base model.

`LoRALinear` is an `nn.Linear` with two more parameters, so the base weights keep their names
(`h.0.attn.c_attn.weight`) and a LoRA checkpoint is a plain one plus `lora_a`/`lora_b` entries.
`merged_state_dict` folds the updates into the weights: the state of a plain GPT; `plain_state_of` does it for a
model, LoRA or not, which is what every export writes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_lightning.model import GPT

Target = Literal["qkv", "attn_proj", "mlp"]
# Where each target lives in a Block: the attention's fused query/key/value and output projections, and the
# MLP's two projections.
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.c_attn",),
    "attn_proj": ("attn.c_proj",),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
}


@dataclasses.dataclass
class LoRAConfig:
    """LoRA's settings.

    Args:
        rank: Rank r of the updates. 0: no LoRA, every weight trains (full fine-tuning).
        alpha: Scale of the updates: they are multiplied by alpha / rank, so changing the rank does not
            change the learning rate that suits them (the paper's choice; litgpt's default alpha is 16).
        dropout: Dropout on the input of the low-rank path only.
        targets: Which projections of each block get an update: qkv (attention's query, key and value,
            one fused matrix), attn_proj (attention's output) and mlp (both of the MLP's).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[Target] = dataclasses.field(default_factory=lambda: ["qkv", "attn_proj"])

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0 (0 turns LoRA off), got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}.")
        unknown = sorted(set(self.targets) - TARGET_MODULES.keys())
        if unknown or (self.rank > 0 and not self.targets):
            raise ValueError(f"model.lora.targets must be some of {sorted(TARGET_MODULES)}, got {self.targets}.")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) dropout(x) A^T B^T, with W and b frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        # Built on the meta device, then given the base's own weight and bias: nothing is allocated or copied.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = scaling(alpha, rank)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)  # (..., r) -> (..., out)
        return super().forward(x) + self.scaling * update


def add_lora(model: GPT, config: LoRAConfig) -> GPT:
    """Freezes `model` and gives the targeted projections of every block a low-rank update (in place)."""
    model.requires_grad_(False)
    for block in model.h:
        for target in config.targets:
            for path in TARGET_MODULES[target]:
                parent_path, name = path.rsplit(".", 1)
                parent = block.get_submodule(parent_path)
                setattr(parent, name, LoRALinear(getattr(parent, name), config.rank, config.alpha, config.dropout))
    return model


def summary(model: GPT, config: LoRAConfig) -> str:
    """What a LoRA fine-tune of `model` trains, in one line."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return (f"LoRA rank {config.rank} on {', '.join(config.targets)}: {trainable:,} trainable parameters; "
            f"the base model's {frozen:,} are frozen")  # fmt: skip


def scaling(alpha: float, rank: int) -> float:
    return alpha / rank


def merged_state_dict(state_dict: dict[str, torch.Tensor], config: LoRAConfig | float) -> dict[str, torch.Tensor]:
    """A LoRA model's weights with the updates folded in, under the plain model's names. `config`: the LoRA
    settings, or the scale of the updates (alpha / rank)."""
    merged = {k: v for k, v in state_dict.items() if not k.endswith((".lora_a", ".lora_b"))}
    scale = config if isinstance(config, float) else scaling(config.alpha, config.rank)
    for key in state_dict:
        if key.endswith(".lora_a"):
            prefix = key.removesuffix(".lora_a")
            update = state_dict[f"{prefix}.lora_b"].float() @ state_dict[key].float()
            weight = merged[f"{prefix}.weight"]
            merged[f"{prefix}.weight"] = (weight.float() + scale * update).to(weight.dtype)
    return merged


def plain_state_of(model: GPT) -> dict[str, torch.Tensor]:
    """The weights `model` computes with, as a plain GPT's state: a LoRA model's updates folded in."""
    scales = {module.scaling for module in model.modules() if isinstance(module, LoRALinear)}
    if len(scales) > 1:
        raise ValueError(f"the model's LoRA layers have different scales ({sorted(scales)}): add_lora gives one.")
    return model.state_dict() if not scales else merged_state_dict(model.state_dict(), float(scales.pop()))
