"""What the README promises about checkpoints, fine-tunes, errors and clusters, each checked as a user
meets it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from gpt_lightning.training.datamodule import TextDataModule
from tests.conftest import ROOT, assert_clean_error, assert_ok, cli, main_py

pytestmark = pytest.mark.slow


class Canary:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def pickled_code(pretrained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint of ours with pickled code added, and the file that code would create."""
    checkpoint = torch.load(pretrained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    canary = tmp_path / "code-ran"
    checkpoint["extra"] = Canary(canary)
    path = tmp_path / "pickled.ckpt"
    torch.save(checkpoint, path)
    return path, canary


@pytest.mark.parametrize("use", ["fit --ckpt_path", "validate --ckpt_path", "generate --ckpt_path", "init_from"])
def test_a_checkpoint_with_pickled_code_is_refused_and_its_code_never_runs(pickled_code, text_file, tmp_path, use):
    path, canary = pickled_code
    common = ["--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.path={text_file}",
              f"--data.cache_dir={tmp_path / 'cache'}", f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    args = {
        "fit --ckpt_path": ["fit", *common, f"--ckpt_path={path}"],
        "validate --ckpt_path": ["validate", *common, f"--ckpt_path={path}"],
        "generate --ckpt_path": ["generate", f"--ckpt_path={path}"],
        "init_from": ["fit", "--config", str(ROOT / "configs/finetune.yaml"), f"--model.init_from={path}",
                      f"--data.path={text_file}", "--data.speakers=null", "--data.text_span=null",
                      f"--trainer.logger.init_args.save_dir={tmp_path}"],
    }[use]  # fmt: skip
    assert_clean_error(cli(*args, in_process=True), "pickled.ckpt is not a readable PyTorch checkpoint")
    assert not canary.exists()


def test_a_fine_tune_resumes_with_init_from_null(pretrained: Path, text_file: Path, tmp_path: Path):
    def finetune(*args: str):
        return cli("fit", "--config", str(ROOT / "configs/finetune.yaml"), "--config",
                   str(ROOT / "configs/trainer/cpu.yaml"), f"--data.path={text_file}", "--data.speakers=null",
                   "--data.text_span=[0.9, 1.0]", f"--data.cache_dir={tmp_path / 'cache'}",
                   f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.val_check_interval=2",
                   "--data.batch_size=4", *args, in_process=True)  # fmt: skip

    assert_ok(finetune(f"--model.init_from={pretrained / 'checkpoints' / 'last.ckpt'}", "--trainer.max_steps=2"))
    assert_ok(finetune("--model.init_from=null", "--ckpt_path=last", "--trainer.max_steps=4"))
    last = tmp_path / "finetune" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4


def test_val_fraction_moves_the_split(text_file: Path, tmp_path: Path):
    sizes = {}
    for fraction in (0.1, 0.25):
        data = TextDataModule(path=str(text_file), cache_dir=str(tmp_path), val_fraction=fraction)
        data.setup("fit")
        sizes[fraction] = (data.train_tokens.numel(), data.val_tokens.numel())
        assert data.describe()["val_fraction"] == fraction
    total = sum(sizes[0.1])
    assert sizes[0.25] == (int(total * 0.75), total - int(total * 0.75))
    assert sizes[0.1] == (int(total * 0.9), total - int(total * 0.9))


def test_gpt_lightning_traceback_shows_the_traceback(tmp_path: Path):
    args = ["fit", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.path={tmp_path / 'missing.txt'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GPT_LIGHTNING_TRACEBACK", None)
    quiet = subprocess.run(main_py(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert_clean_error(quiet, r"missing.txt does not exist", "set GPT_LIGHTNING_TRACEBACK=1")
    loud = subprocess.run(main_py(*args), cwd=tmp_path, env={**env, "GPT_LIGHTNING_TRACEBACK": "1"},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert loud.returncode != 0
    assert "Traceback (most recent call last)" in loud.stderr and "FileNotFoundError" in loud.stderr


def test_the_slurm_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts/slurm_ddp.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
