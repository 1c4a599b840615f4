"""The commands besides fit and validate: plain functions whose typed, documented signatures are their
command lines (`python main.py NAME --help`). A new command is a function here and a line in COMMANDS."""

from __future__ import annotations

from typing import Any

from gpt_lightning.commands.export import export
from gpt_lightning.commands.generate import generate
from gpt_lightning.commands.serve import serve
from gpt_lightning.evaluation.run import evaluate
from gpt_lightning.tokenizer_eval import evaluate_tokenizer
from gpt_lightning.tokenizer_training import train_tokenizer

# The command line's names, each a function or a group of them (`tokenizer train`), with a "_help" line.
COMMANDS: dict[str, Any] = {
    "generate": generate,
    "export": export,
    "serve": serve,
    "evaluate": evaluate,
    "tokenizer": {
        "_help": "Train a byte-level BPE on your text, or measure one.",
        "train": train_tokenizer,
        "evaluate": evaluate_tokenizer,
    },
}

__all__ = ["COMMANDS", "evaluate", "evaluate_tokenizer", "export", "generate", "serve", "train_tokenizer"]
