"""What a checkpoint is used for decides what is read from it: `model.init_from` starts a new run from its
weights (and checks the fine-tuning text against its training split); `--ckpt_path` resumes or validates
it, with its own architecture, vocabulary and optimizer, and nothing else."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import lightning
import pytest
import torch

from gpt_lightning.checkpoint import METADATA_KEY, metadata
from gpt_lightning.datamodule import ShakespeareDataModule
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.tokenizer import CharTokenizer
from tests.conftest import ROOT, TINY, assert_clean_error, assert_ok, cli, make_play

pytestmark = pytest.mark.slow

TEMPEST = "\n\nPROSPERO:\nNow does my project gather to a head.\n\nMIRANDA:\nO brave new world!\n"


def pretraining_checkpoint(text: Path, path: Path, optimizer: str = "adamw") -> Path:
    """A checkpoint as pre-training on all of `text` writes it (random weights will do)."""
    tokenizer = CharTokenizer.from_text(text.read_text(encoding="utf-8"))
    config = GPTConfig(vocab_size=len(tokenizer.vocab), block_size=32, n_layer=2, n_head=2, n_embd=32)
    data = {"source": str(text), "source_sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
            "selection": {"span": None, "speakers": None}, "val_fraction": 0.1}  # fmt: skip
    state = {f"gpt.{k}": v for k, v in GPT(config).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"optimizer": optimizer}, "global_step": 0,
                "pytorch-lightning_version": lightning.__version__,
                METADATA_KEY: metadata(config, tokenizer, data)}, path)  # fmt: skip
    return path


@pytest.fixture
def play_with_a_tempest(tmp_path: Path) -> Path:
    """Generated text whose last 10% holds the only speeches of finetune.yaml's speakers."""
    path = tmp_path / "play.txt"
    path.write_text(make_play(300) + TEMPEST * 8, encoding="utf-8")
    return path


def finetune(text: Path, checkpoint: Path, tmp_path: Path, *args: str):
    configs = ["--config", str(ROOT / "configs/finetune.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml")]
    return cli("fit", *configs, f"--model.init_from={checkpoint}", f"--data.path={text}",
               f"--data.cache_dir={tmp_path / 'cache'}",
               f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=1", "--data.batch_size=4",
               *args, in_process=True)  # fmt: skip


@pytest.mark.parametrize("span", ["null", "[0.8, 1.0]"])
def test_speakers_absent_from_the_overlap_mean_no_overlap_not_an_error(play_with_a_tempest, tmp_path, span):
    checkpoint = pretraining_checkpoint(play_with_a_tempest, tmp_path / "pre.ckpt")
    result = finetune(play_with_a_tempest, checkpoint, tmp_path, f"--data.text_span={span}")
    assert_ok(result)
    assert "lies in the training split" not in result.stderr


def test_a_fine_tune_inside_the_training_split_is_still_warned_about(play_with_a_tempest, tmp_path):
    checkpoint = pretraining_checkpoint(play_with_a_tempest, tmp_path / "pre.ckpt")
    data = ShakespeareDataModule(path=str(play_with_a_tempest), cache_dir=str(tmp_path / "cache"),
                                 init_from=str(checkpoint), speakers=["FIRST CITIZEN"])  # fmt: skip
    with pytest.warns(UserWarning, match=r"about (8[5-9]|9\d)% of the fine-tuning text lies in the training split"):
        data.warn_of_overlap()
    held_out = ShakespeareDataModule(path=str(play_with_a_tempest), cache_dir=str(tmp_path / "cache"),
                                     init_from=str(checkpoint), speakers=["PROSPERO"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        held_out.warn_of_overlap()  # all of PROSPERO's speeches lie in the validation split


def recipe_run(subcommand: str, text: Path, checkpoint: Path, tmp_path: Path, *args: str):
    """The CPU recipe as a user runs it (its own 4-layer architecture), on a 2-layer checkpoint."""
    tiny_run = [a for a in TINY if not a.startswith(("--model.", "--data."))]
    logger = [f"--trainer.logger.init_args.save_dir={tmp_path}"] if subcommand == "fit" else []
    return cli(subcommand, "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--ckpt_path={checkpoint}",
               f"--data.path={text}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.val_batch_size=64",
               *tiny_run, *logger, *args, in_process=True)  # fmt: skip


def test_validate_takes_the_checkpoints_architecture_warns_of_nothing_and_builds_no_other_cache(text_file, tmp_path):
    from gpt_lightning.token_cache import build_token_cache

    checkpoint = pretraining_checkpoint(text_file, tmp_path / "pre.ckpt")
    build_token_cache(text_file, tmp_path / "cache")  # what the pre-training run left in its cache folder
    result = recipe_run("validate", text_file, checkpoint, tmp_path)
    assert_ok(result)
    assert "val/loss" in result.stdout
    assert "fine-tuning" not in result.stderr
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1


def test_resuming_takes_the_checkpoints_architecture(pretrained: Path, text_file: Path, tmp_path: Path):
    checkpoint = pretrained / "checkpoints" / "last.ckpt"
    result = recipe_run("fit", text_file, checkpoint, tmp_path, "--trainer.max_steps=41")
    assert_ok(result)
    assert "fine-tuning" not in result.stderr
    assert torch.load(next(tmp_path.glob("**/last.ckpt")), weights_only=True)["global_step"] == 41


@pytest.mark.parametrize(("saved", "asked"), [("muon", "adamw"), ("adamw", "muon")])
def test_resuming_with_another_optimizer_names_the_flag(text_file: Path, tmp_path: Path, saved: str, asked: str):
    checkpoint = pretraining_checkpoint(text_file, tmp_path / "pre.ckpt", optimizer=saved)
    result = recipe_run("fit", text_file, checkpoint, tmp_path, f"--model.optimizer={asked}")
    assert_clean_error(result, f"model.optimizer={saved}", f"--model.optimizer {saved}")
