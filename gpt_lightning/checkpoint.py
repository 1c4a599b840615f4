"""The old home of checkpoint reading, kept so that `from gpt_lightning.checkpoint import load_model` (and the
other names below) go on working. Model sources are opened in `gpt_lightning.sources`."""

from __future__ import annotations

from gpt_lightning.sources import (
    DECIDED_BY_CHECKPOINT,
    METADATA_KEY,
    MODEL_PREFIX,
    ModelSource,
    export_plain_checkpoint,
    load_checkpoint,
    load_model,
    metadata,
    model_state_dict,
    open_source,
)

CheckpointFacts = ModelSource
describe_checkpoint = open_source

__all__ = [
    "DECIDED_BY_CHECKPOINT",
    "METADATA_KEY",
    "MODEL_PREFIX",
    "CheckpointFacts",
    "ModelSource",
    "describe_checkpoint",
    "export_plain_checkpoint",
    "load_checkpoint",
    "load_model",
    "metadata",
    "model_state_dict",
    "open_source",
]
