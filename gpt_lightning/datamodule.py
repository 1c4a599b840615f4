"""`gpt_lightning.datamodule.ShakespeareDataModule`, the class path of configs written before the layer folders:
the class lives in gpt_lightning/training/datamodule.py."""

from gpt_lightning.training.datamodule import ShakespeareDataModule

__all__ = ["ShakespeareDataModule"]
