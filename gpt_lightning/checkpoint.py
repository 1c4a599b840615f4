"""Reading our checkpoints without Lightning: the model config and vocabulary travel with the weights.

A checkpoint is a Lightning `.ckpt` whose "gpt_lightning" entry holds the model config and tokenizer,
so a `.ckpt` alone is enough to sample from or to fine-tune. Everything is loaded with
`weights_only=True`: unpickling an untrusted file could otherwise run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gpt_lightning.data import atomic_write_bytes
from gpt_lightning.hf import (
    config_of_hf_gpt2,
    cropped,
    hf_gpt2_folder,
    is_hf_gpt2,
    load_hf_gpt2_weights,
    tokenizer_of_hf_folder,
)
from gpt_lightning.lora import LoRAConfig, add_lora, merged_state_dict, plain_state_of
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.tokenizer import Tokenizer, tokenizer_from_dict

METADATA_KEY = "gpt_lightning"
MODEL_PREFIX = "gpt."  # the LightningModule keeps the network in `self.gpt`
# What a checkpoint decides about a model built from it, fine-tuned (init_from), resumed or validated
# (--ckpt_path): every field of its config (architecture, vocabulary size, context) but dropout, which a
# fine-tune may change. Derived from GPTConfig, so that a new field cannot be left out.
DECIDED_BY_CHECKPOINT = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "dropout")


def metadata(
    config: GPTConfig, tokenizer: Tokenizer, data: dict[str, Any] | None = None, lora: LoRAConfig | None = None
) -> dict[str, Any]:
    """The checkpoint's own description: model config, vocabulary, the LoRA updates its weights include (if
    any) and, where known, the training data (its source, sha256, selection and validation split)."""
    described = {"format": 1, "model_config": dataclasses.asdict(config), "tokenizer": tokenizer.to_dict()}
    if lora is not None and lora.enabled:
        described["lora"] = dataclasses.asdict(lora)
    return described if data is None else {**described, "data": data}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads one of our checkpoints onto the CPU, with clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a .ckpt: a Hugging Face GPT-2 folder is a start (model.init_from), "
                         "not a run to resume or validate (--ckpt_path).")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path (runs/*/version_*/checkpoints/).")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: it is not a file written by torch.save.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({first_line}).") from err
    if not isinstance(checkpoint, dict) or METADATA_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} is not a gpt-lightning checkpoint (it lacks the model config and vocabulary): "
            "use a .ckpt written by `python main.py fit`."
        )
    return checkpoint


def model_config_of(checkpoint: dict[str, Any]) -> GPTConfig:
    return GPTConfig(**checkpoint[METADATA_KEY]["model_config"])


def tokenizer_of(checkpoint: dict[str, Any]) -> Tokenizer:
    return tokenizer_from_dict(checkpoint[METADATA_KEY]["tokenizer"])


def lora_of(checkpoint: dict[str, Any]) -> LoRAConfig | None:
    """The LoRA updates a fine-tune's weights hold beside the frozen base weights, if any."""
    lora = checkpoint[METADATA_KEY].get("lora")
    return None if lora is None else LoRAConfig(**lora)


def data_of(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """What the checkpoint's run trained on, for checkpoints that record it."""
    return checkpoint[METADATA_KEY].get("data")


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The GPT's own weights, without the LightningModule's attribute prefix (LoRA's A and B included)."""
    return {k[len(MODEL_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def plain_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a plain GPT: a LoRA fine-tune's updates folded into its base weights."""
    lora = lora_of(checkpoint)
    state = model_state_dict(checkpoint)
    return state if lora is None else merged_state_dict(state, lora)


@dataclasses.dataclass(frozen=True)
class CheckpointFacts:
    """What a model source says about itself, read once however many parts of a run ask: one of our
    checkpoints, a Hugging Face GPT-2 folder or a hub name. Its weights are read on demand (`load_weights_into`)."""

    source: str  # the path or hub name it was described from
    config: GPTConfig
    tokenizer: Tokenizer
    data: dict[str, Any] | None  # what the run trained on, where the checkpoint records it
    optimizer: str  # the model.optimizer it was trained with; its optimizer state fits no other
    global_step: int
    lora: LoRAConfig | None = None  # the LoRA updates the weights include
    hf_folder: Path | None = None  # where the weights are, for a Hugging Face GPT-2 rather than a .ckpt
    resumable: bool = False  # holds a run's training state (optimizer, loops), not only weights: an export doesn't

    def config_for(self, given: Mapping[str, Any], dropout: float = 0.0) -> GPTConfig:
        """The config of a model built from this source, given the settings the user gave ({option: value},
        None for unset; options such as model.n_layer or data.block_size): the source's own, with `dropout`.
        The one rule of what a checkpoint decides (DECIDED_BY_CHECKPOINT): a given setting that differs is an
        error naming it, except that a GPT-2 folder's position table may be cropped to a smaller block_size."""
        by_field = {option.rsplit(".", 1)[-1]: (option, value) for option, value in given.items() if value is not None}
        unknown = sorted(set(by_field) - set(DECIDED_BY_CHECKPOINT))
        assert not unknown, f"not decided by a checkpoint: {unknown}"
        config = dataclasses.replace(self.config, dropout=dropout)
        if self.hf_folder is not None and "block_size" in by_field:
            option, block_size = by_field.pop("block_size")
            config = cropped(config, block_size, self.source, option)
        conflicts = [f"{option}={value} (checkpoint: {getattr(config, field)})"
                     for field, (option, value) in by_field.items() if value != getattr(config, field)]  # fmt: skip
        if conflicts:
            raise ValueError(
                f"checkpoint {self.source} has another architecture: {', '.join(conflicts)}. The checkpoint "
                "defines the architecture, vocabulary and context when fine-tuning, resuming or validating: drop "
                "these settings."
            )
        return config

    def load_weights_into(self, model: GPT) -> GPT:
        """Loads the source's weights into `model`, a plain GPT of `config_for`'s config: a LoRA fine-tune's with
        its updates merged, a GPT-2's with its position table cropped to the model's."""
        if self.hf_folder is not None:
            load_hf_gpt2_weights(model, self.hf_folder)
        else:
            model.load_state_dict(plain_state_dict(load_checkpoint(self.source)))
        return model


def describe_checkpoint(path: str | Path) -> CheckpointFacts:
    """The facts of one of our checkpoints (read once per file version: the CLI, the data module and the
    model all ask), or of a Hugging Face GPT-2 folder or hub name. The one reader of a model source's
    description: everything else that opens one (load_model, the model's init_from) starts here."""
    if is_hf_gpt2(path):
        folder = hf_gpt2_folder(path)
        config = config_of_hf_gpt2(folder)
        tokenizer = tokenizer_of_hf_folder(folder, config.vocab_size)
        return CheckpointFacts(source=str(path), config=config, tokenizer=tokenizer, data=None, optimizer="adamw",
                               global_step=0, hf_folder=folder)  # fmt: skip
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _facts(path.resolve(), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0, path)


@functools.lru_cache(maxsize=8)
def _facts(resolved: Path, mtime_ns: int, size: int, path: Path) -> CheckpointFacts:
    checkpoint = load_checkpoint(path)
    return CheckpointFacts(
        source=str(path),
        config=model_config_of(checkpoint),
        tokenizer=tokenizer_of(checkpoint),
        data=data_of(checkpoint),
        optimizer=checkpoint.get("hyper_parameters", {}).get("optimizer", "adamw"),
        global_step=int(checkpoint.get("global_step", 0)),
        lora=lora_of(checkpoint),
        resumable="optimizer_states" in checkpoint,  # what an export leaves out
    )


def load_model(path: str | Path, merge_lora: bool = False) -> tuple[GPT, Tokenizer]:
    """The trained GPT (in eval mode, on the CPU) and its tokenizer, from one of our checkpoints, a Hugging
    Face GPT-2 folder (config.json, model.safetensors and its tokenizer), or a hub name such as `gpt2`. A LoRA
    fine-tune comes with its low-rank updates beside the frozen weights, or, with `merge_lora`, as a plain
    GPT whose weights include them."""
    facts = describe_checkpoint(path)
    model = GPT(facts.config)
    if facts.lora is not None and not merge_lora:
        add_lora(model, facts.lora)
        model.load_state_dict(model_state_dict(load_checkpoint(path)))
    else:
        facts.load_weights_into(model)
    return model.eval(), facts.tokenizer


def export_plain_checkpoint(source: str | Path, model: GPT, output: str | Path) -> Path:
    """Writes the weights `model` computes with (a LoRA fine-tune's merged) as a plain checkpoint of ours with
    `source`'s description and no training state: enough to sample, validate, serve, fine-tune from
    (init_from) and export. Never overwrites a file."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists: export into a new file.")
    checkpoint = load_checkpoint(source)
    described = {k: v for k, v in checkpoint[METADATA_KEY].items() if k != "lora"}
    plain = {
        "state_dict": {MODEL_PREFIX + k: v.contiguous() for k, v in plain_state_of(model).items()},
        METADATA_KEY: described,
        "global_step": checkpoint.get("global_step", 0),
    }
    # Lightning reads it before it loads any checkpoint (validate --ckpt_path): the version that wrote the source.
    for key in ("pytorch-lightning_version",):
        if key in checkpoint:
            plain[key] = checkpoint[key]
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    atomic_write_bytes(output, buffer.getvalue())
    return output
