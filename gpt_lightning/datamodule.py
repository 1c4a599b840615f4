"""`gpt_lightning.datamodule.ShakespeareDataModule`, the class path of configs written before the layer folders
and before the class was named for what it takes (any text): both names are TextDataModule, in
gpt_lightning/training/datamodule.py."""

from gpt_lightning.training.datamodule import ShakespeareDataModule, TextDataModule

__all__ = ["ShakespeareDataModule", "TextDataModule"]
