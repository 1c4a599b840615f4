"""`gpt_lightning.task_datamodule.TaskDataModule`, the class path of configs written before the layer folders: the class
lives in gpt_lightning/training/task_datamodule.py."""

from gpt_lightning.training.task_datamodule import TaskDataModule

__all__ = ["TaskDataModule"]
