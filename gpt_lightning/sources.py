"""Model sources: one of our checkpoints, a Hugging Face GPT-2 folder or a hub name, opened in one place.

`open_source` reads what a source says about itself into one `ModelSource`: config, tokenizer, LoRA, what it
trained on, its step, and its weights on demand. It is the only reader of a model source, and `ModelSource` the
only place that decides what a source overrides when a run starts from it (nanochat's `build_model`, nanoGPT's
one `init_from` block). Our checkpoint is a Lightning `.ckpt` whose "gpt_lightning" entry holds the model config
and tokenizer, so a `.ckpt` alone is enough to sample from or to fine-tune. Everything is loaded with
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

from gpt_lightning.data.corpus import atomic_write_bytes
from gpt_lightning.data.instruct import Template
from gpt_lightning.hf import config_of_hf_gpt2, cropped, is_hf_gpt2, load_hf_gpt2_weights, tokenizer_of_hf_folder
from gpt_lightning.hub import hf_gpt2_folder
from gpt_lightning.lora import LoRAConfig, add_lora, merged_state_dict, plain_state_of
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.tokenizer import CharTokenizer, Tokenizer, tokenizer_from_dict

METADATA_KEY = "gpt_lightning"
MODEL_PREFIX = "gpt."  # the LightningModule keeps the network in `self.gpt`
# What a checkpoint decides about a model built from it, fine-tuned (init_from), resumed or validated
# (--ckpt_path): every field of its config (architecture, vocabulary size, context) but dropout, which a
# fine-tune may change, and the vocabulary's padding (model.vocab_size), which is not architecture. Derived from
# GPTConfig, so that a new field cannot be left out. (A fine-tune's vocabulary may grow past the checkpoint's by
# characters appended to it: data.grow_vocab, build_network.)
NOT_DECIDED = ("dropout", "padded_vocab_size")
DECIDED_BY_CHECKPOINT = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in NOT_DECIDED)


def metadata(
    config: GPTConfig,
    tokenizer: Tokenizer,
    data: dict[str, Any] | None = None,
    lora: LoRAConfig | None = None,
    template: Template | None = None,
) -> dict[str, Any]:
    """The checkpoint's own description: model config, vocabulary, the LoRA updates its weights include (if
    any), the template of a fine-tune on task data (if any) and, where known, the training data (its source,
    sha256, selection and validation split; or its task)."""
    described = {"format": 1, "model_config": dataclasses.asdict(config), "tokenizer": tokenizer.to_dict()}
    if lora is not None and lora.enabled:
        described["lora"] = dataclasses.asdict(lora)
    if template is not None:
        described["template"] = template.to_dict()
    return described if data is None else {**described, "data": data}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What a model source says about itself, read once however many parts of a run ask. Its weights are read
    on demand (`load_weights_into`, `model`)."""

    source: str  # the path or hub name it was opened from
    config: GPTConfig
    tokenizer: Tokenizer
    data: dict[str, Any] | None  # what the run trained on, where the checkpoint records it
    optimizer: str  # the model.optimizer it was trained with; its optimizer state fits no other
    global_step: int
    lora: LoRAConfig | None = None  # the LoRA updates the weights include
    hf_folder: Path | None = None  # where the weights are, for a Hugging Face GPT-2 rather than a .ckpt
    resumable: bool = False  # holds a run's training state (optimizer, loops), not only weights: an export doesn't
    best_val_loss: float | None = None  # the best validation loss its run's ModelCheckpoint recorded
    described: dict[str, Any] = dataclasses.field(default_factory=dict)  # a checkpoint's own description, as saved
    lightning_version: str | None = None  # of the Lightning that wrote it
    template: Template | None = None  # how a fine-tune on task data reads prompts; None for a model of plain text

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

    def settings_replacing(self, model: Mapping[str, Any], block_size: int | None) -> tuple[dict[str, Any], list[str]]:
        """The model settings of a run resumed or validated from this checkpoint, which is then its only source:
        the architecture and LoRA's layers, whatever the recipe (`model`, the model section; `block_size`, the
        data's) says, since they usually come from a config file, not from the user. Also what they replace, as
        `option=given -> checkpoint's` lines. The block size is the data module's, from the same checkpoint."""
        settings: dict[str, Any] = {field: getattr(self.config, field) for field in DECIDED_BY_CHECKPOINT
                                    if field != "block_size"}  # fmt: skip
        settings["vocab_size"] = self.config.vocab_rows  # model.vocab_size is the embedding's rows, padding included
        replaced = [f"model.{field}={model[field]} -> {value}" for field, value in settings.items()
                    if model.get(field) is not None and model[field] != value]  # fmt: skip
        settings["lora"] = dataclasses.asdict(self.lora or LoRAConfig())  # LoRA's layers are part of the architecture
        given = model.get("lora")
        if given is not None and given.get("rank") != settings["lora"]["rank"]:
            replaced.append(f"model.lora.rank={given.get('rank')} -> {settings['lora']['rank']}")
        if block_size is not None and block_size != self.config.block_size:
            replaced.append(f"data.block_size={block_size} -> {self.config.block_size}")
        return settings, replaced

    def tokenizer_for(self, asked: Tokenizer | None, spec: str | None) -> Tokenizer:
        """The tokenizer of a run started from this source: its own. `asked` (None: unset, or characters) is
        what data.tokenizer `spec` names, and another tokenizer than the source's is an error."""
        same = isinstance(self.tokenizer, CharTokenizer) if asked is None else asked == self.tokenizer
        if spec is not None and not same:
            raise ValueError(
                f"data.tokenizer {spec} is not the tokenizer of {self.source} ({_described(self.tokenizer)}): a model "
                "reads only the ids of the tokenizer it was trained with. Drop data.tokenizer to use the checkpoint's."
            )
        return self.tokenizer

    def tokens_added_by(self, tokenizer: Tokenizer) -> int:
        """How many characters `tokenizer` appends to this source's vocabulary (data.grow_vocab): 0 for the
        source's own tokenizer. Any other tokenizer is an error: the model reads only the ids it was trained with."""
        if tokenizer == self.tokenizer:
            return 0
        if isinstance(tokenizer, CharTokenizer) and tokenizer.extends(self.tokenizer):
            return tokenizer.vocab_size - self.tokenizer.vocab_size
        raise ValueError(
            f"the run's tokenizer ({_described(tokenizer)}) is not the tokenizer of {self.source} "
            f"({_described(self.tokenizer)}), nor its vocabulary with characters appended (data.grow_vocab): a "
            "model reads only the ids of the tokenizer it was trained with. Use the checkpoint's tokenizer."
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A checkpoint's GPT weights, without the LightningModule's attribute prefix (LoRA's A and B included)."""
        return model_state_dict(load_checkpoint(self.source))

    def load_weights_into(self, model: GPT) -> GPT:
        """Loads the source's weights into `model`, a plain GPT of `config_for`'s config: a LoRA fine-tune's with
        its updates merged, a GPT-2's with its position table cropped to the model's."""
        if self.hf_folder is not None:
            load_hf_gpt2_weights(model, self.hf_folder)
        else:
            state = self.state_dict()
            model.load_state_dict(state if self.lora is None else merged_state_dict(state, self.lora))
        return model

    def model(self, merge_lora: bool = False) -> GPT:
        """The trained GPT, in eval mode on the CPU. A LoRA fine-tune comes with its low-rank updates beside the
        frozen weights, or, with `merge_lora`, as a plain GPT whose weights include them."""
        model = GPT(self.config)
        if self.lora is not None and not merge_lora:
            add_lora(model, self.lora)
            model.load_state_dict(self.state_dict())
        else:
            self.load_weights_into(model)
        return model.eval()


def open_source(path: str | Path) -> ModelSource:
    """What a model source holds: one of our checkpoints (read once per file version: the CLI, the data module
    and the model all ask), a Hugging Face GPT-2 folder (config.json, model.safetensors and its tokenizer), or a
    hub name such as `gpt2`. The one place that opens any of them."""
    if is_hf_gpt2(path):
        folder = hf_gpt2_folder(path)
        config = config_of_hf_gpt2(folder)
        tokenizer = tokenizer_of_hf_folder(folder, config.vocab_size)
        return ModelSource(source=str(path), config=padded_past(tokenizer, config), tokenizer=tokenizer, data=None,
                           optimizer="adamw", global_step=0, hf_folder=folder)  # fmt: skip
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _open_checkpoint(path.resolve(), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0, path)


@functools.lru_cache(maxsize=8)
def _open_checkpoint(resolved: Path, mtime_ns: int, size: int, path: Path) -> ModelSource:
    checkpoint = load_checkpoint(path)
    described = checkpoint[METADATA_KEY]
    scores = [float(state["best_model_score"]) for key, state in checkpoint.get("callbacks", {}).items()
              if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None]  # fmt: skip
    tokenizer = tokenizer_from_dict(described["tokenizer"])
    return ModelSource(
        source=str(path),
        config=padded_past(tokenizer, GPTConfig(**described["model_config"])),
        tokenizer=tokenizer,
        data=described.get("data"),
        optimizer=checkpoint.get("hyper_parameters", {}).get("optimizer", "adamw"),
        global_step=int(checkpoint.get("global_step", 0)),
        lora=None if described.get("lora") is None else LoRAConfig(**described["lora"]),
        resumable="optimizer_states" in checkpoint,  # what an export leaves out
        template=None if described.get("template") is None else Template.from_dict(described["template"]),
        best_val_loss=min(scores) if scores else None,
        described=dict(described),
        lightning_version=checkpoint.get("pytorch-lightning_version"),
    )


def padded_past(tokenizer: Tokenizer, config: GPTConfig) -> GPTConfig:
    """The config of a source whose embedding may have more rows than its tokenizer has tokens (a Hugging Face
    GPT-2 so padded, a checkpoint written before GPTConfig.padded_vocab_size): no tokenizer can write or read the
    ids of those rows, so they are padding, and the model predicts the tokenizer's tokens only."""
    if config.vocab_size <= tokenizer.vocab_size:
        return config
    return dataclasses.replace(config, vocab_size=tokenizer.vocab_size, padded_vocab_size=config.vocab_rows)


def build_network(
    source: ModelSource | None,
    tokenizer: Tokenizer,
    block_size: int,
    architecture: Mapping[str, Any],
    dropout: float = 0.0,
    lora: LoRAConfig | None = None,
) -> GPT:
    """The network a run trains, and the one place it is made (nanoGPT's `init_from` block): fresh, of
    GPTConfig's defaults with the `architecture` settings given ({GPTConfig field: value}, None for unset), or
    with the weights and architecture of `source`, which a differing given setting contradicts (`config_for`).
    A `tokenizer` that appends characters to the source's (data.grow_vocab) gets rows for them, each the mean
    of the old rows (`GPT.grow_vocab`). The `architecture`'s vocab_size (model.vocab_size) is not the
    vocabulary, the tokenizer's, but the rows of the embedding, padded for speed: unset, the source's, else the
    tokenizer's, rounded up to a multiple of `vocab_multiple` (model.vocab_multiple); a source's padding is re-cut
    to it (`GPT.pad_vocab`). LoRA's low-rank updates are added last, the weights beneath them frozen."""
    architecture = dict(architecture)
    rows, tokens = architecture.pop("vocab_size", None), tokenizer.vocab_size
    multiple = architecture.pop("vocab_multiple", 1)
    if rows is not None and rows < tokens:
        raise ValueError(f"model.vocab_size {rows} is less than the tokenizer's {tokens} tokens: "
                         f"drop it, or give {tokens} or more.")  # fmt: skip
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"model.vocab_multiple must be a positive integer (64 pads GPT-2's 50,257 tokens to 50,304; "
                         f"1 pads nothing), got {multiple!r}.")  # fmt: skip
    if source is None:
        defaults = GPTConfig(vocab_size=tokens, block_size=block_size, dropout=dropout)
        gpt = GPT(dataclasses.replace(defaults, **{k: v for k, v in architecture.items() if v is not None}))
    else:
        added = source.tokens_added_by(tokenizer)
        if added and lora is not None and lora.enabled:
            raise ValueError(
                f"data.grow_vocab added {added} character(s) to the vocabulary of {source.source}, but LoRA freezes "
                "the token embedding (and the head tied to it): their rows would stay the mean of the others, so the "
                "model could never tell them apart or write them. Fine-tune every weight (model.lora.rank 0) to grow "
                "the vocabulary."
            )
        given = {**{f"model.{k}": v for k, v in architecture.items()}, "data.block_size": block_size}
        gpt = source.load_weights_into(GPT(source.config_for(given, dropout)))
        if added:
            gpt.grow_vocab(source.tokenizer.vocab_size, tokens)
    if rows is None:  # a resume gives its checkpoint's rows: a multiple never re-cuts them
        rows = -(-gpt.config.vocab_rows // multiple) * multiple
    if rows != gpt.config.vocab_rows:
        gpt.pad_vocab(rows)
    if lora is not None and lora.enabled:
        add_lora(gpt, lora)
    return gpt


def load_model(path: str | Path, merge_lora: bool = False) -> tuple[GPT, Tokenizer]:
    """The trained GPT (in eval mode, on the CPU) and its tokenizer, from any model source (`open_source`). A
    LoRA fine-tune comes with its low-rank updates beside the frozen weights, or, with `merge_lora`, as a plain
    GPT whose weights include them."""
    source = open_source(path)
    return source.model(merge_lora), source.tokenizer


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads one of our checkpoints onto the CPU (memory-mapped), with clear errors for anything else."""
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


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The GPT's own weights in a loaded checkpoint, without the LightningModule's attribute prefix."""
    return {k[len(MODEL_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def export_plain_checkpoint(source: str | Path, model: GPT, output: str | Path) -> Path:
    """Writes the weights `model` computes with (a LoRA fine-tune's merged) as a plain checkpoint of ours with
    `source`'s description and no training state: enough to sample, validate, serve, fine-tune from
    (init_from) and export. Never overwrites a file."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists: export into a new file.")
    opened = open_source(source)
    if opened.hf_folder is not None:
        raise ValueError(f"{source} is a Hugging Face GPT-2, not a checkpoint of ours, and has no description to "
                         "keep: export it to a folder (an output not ending in .ckpt).")  # fmt: skip
    plain: dict[str, Any] = {
        "state_dict": {MODEL_PREFIX + k: v.contiguous() for k, v in plain_state_of(model).items()},
        METADATA_KEY: {k: v for k, v in opened.described.items() if k != "lora"},
        "global_step": opened.global_step,
    }
    # Lightning reads it before it loads any checkpoint (validate --ckpt_path): the version that wrote the source.
    if opened.lightning_version is not None:
        plain["pytorch-lightning_version"] = opened.lightning_version
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    atomic_write_bytes(output, buffer.getvalue())
    return output


def _described(tokenizer: Tokenizer) -> str:
    if isinstance(tokenizer, CharTokenizer):
        return f"{tokenizer.vocab_size} characters"
    return f"a {tokenizer.vocab_size}-token BPE"
