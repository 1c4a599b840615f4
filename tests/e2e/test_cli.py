"""End-to-end runs of `python main.py` in subprocesses, on generated text with a tiny model."""

import json
import math
import re
import sys
from pathlib import Path

import pytest

from gpt_lightning.sources import load_checkpoint, open_source
from tests.conftest import ROOT, assert_ok, cli, fit_args, main_in_process, make_play, scalars, text_samples, tiny_fit

pytestmark = pytest.mark.slow


def test_fit_logs_curves_samples_and_checkpoints(pretrained: Path, text_file: Path):
    logged = scalars(pretrained)
    assert [step for step, _ in logged["train/loss"]] == list(range(40))
    assert [step for step, _ in logged["val/loss"]] == [19, 39]
    vocab_size = len(set(text_file.read_text()))
    assert logged["val/loss"][-1][1] < math.log(vocab_size) - 0.7  # it learned something
    assert len(logged["train/grad_norm"]) == 40
    assert "train/lr" in logged
    assert len(logged["train/tokens_per_sec"]) == 40 and "train/mfu" not in logged  # no known peak on a CPU
    assert len(text_samples(pretrained)) == 2
    assert (pretrained / "config.yaml").is_file()
    checkpoints = sorted(p.name for p in (pretrained / "checkpoints").iterdir())
    assert checkpoints == ["best-step=40.ckpt", "last.ckpt"]
    checkpoint = load_checkpoint(pretrained / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 40
    tokenizer = open_source(pretrained / "checkpoints" / "last.ckpt").tokenizer
    assert tokenizer.vocab == "".join(sorted(set(text_file.read_text())))


def test_a_second_fit_never_overwrites_the_first(text_file: Path, tmp_path: Path):
    for _ in range(2):
        assert_ok(tiny_fit(text_file, tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=2"))
    first, second = tmp_path / "run" / "version_0", tmp_path / "run" / "version_1"
    assert (first / "checkpoints" / "last.ckpt").is_file() and (second / "checkpoints" / "last.ckpt").is_file()
    assert load_checkpoint(first / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_fine_tune_starts_from_the_pretrained_weights(pretrained: Path, text_file: Path, tmp_path: Path):
    target = tmp_path / "target.txt"
    target.write_text(make_play(200, seed=7))  # other text, same characters
    result = cli(
        "fit", "--config", str(ROOT / "configs/finetune.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml"),
        f"--model.init_from={pretrained / 'checkpoints' / 'last.ckpt'}", f"--data.path={target}",
        "--data.speakers=[KING ARTHUR, LADY BEATRICE]", "--data.text_span=null", "--data.batch_size=8",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=6", "--trainer.val_check_interval=3",
        "--trainer.log_every_n_steps=1", "--progress_bar.refresh_rate=0", "--sample.max_new_tokens=10",
    )  # fmt: skip
    assert_ok(result)
    pretrained_loss = scalars(pretrained)["train/loss"][-1][1]
    first_loss = scalars(tmp_path / "finetune" / "version_0")["train/loss"][0][1]
    vocab_size = len(set(text_file.read_text()))
    assert abs(first_loss - pretrained_loss) < 0.4, (first_loss, pretrained_loss)
    assert first_loss < math.log(vocab_size) - 0.7
    checkpoint = load_checkpoint(tmp_path / "finetune" / "version_0" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 6  # steps start fresh: not a resume
    source = load_checkpoint(pretrained / "checkpoints" / "last.ckpt")["gpt_lightning"]
    for key in ("model_config", "tokenizer"):
        assert checkpoint["gpt_lightning"][key] == source[key]
    assert checkpoint["gpt_lightning"]["data"]["source"] == str(target)  # and it says what it trained on


def test_ddp_on_two_cpu_processes(text_file: Path, tmp_path: Path):
    probe = tmp_path / "probe"
    result = tiny_fit(
        text_file, tmp_path / "runs", "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"),
        "--trainer.max_steps=6", "--trainer.val_check_interval=3",
        "--trainer.callbacks+=tests.probe.RecordRank", f"--trainer.callbacks.out_dir={probe}",
    )  # fmt: skip
    assert_ok(result)
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 6
    assert all(a != b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True))  # different data
    assert ranks[0]["weights"] == ranks[1]["weights"]  # identical weights
    logged = [loss for _, loss in scalars(tmp_path / "runs" / "run" / "version_0")["train/loss"]]
    rank_mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    assert logged == pytest.approx(rank_mean, abs=1e-6)  # train/loss is the mean over ranks, not rank 0's
    assert [p.name for p in (tmp_path / "runs" / "run").iterdir()] == ["version_0"]  # one run, one set of logs
    assert len(list((tmp_path / "runs" / "run" / "version_0").glob("events.out.tfevents.*"))) == 1


def test_print_config_prints_the_whole_documented_config():
    result = cli("fit", "--config", str(ROOT / "configs/pretrain.yaml"), "--print_config")
    assert_ok(result)
    for expected in ["n_layer: 6", "dropout: 0.2", "batch_size: 64", "max_steps: 5000", "precision: bf16-mixed",
                     "every_n_train_steps: 250", "# Transformer blocks", "# Sequences per batch"]:  # fmt: skip
        assert expected in result.stdout, expected


def test_validate_a_checkpoint_with_its_own_architecture(pretrained: Path, text_file: Path, tmp_path: Path):
    result = cli(
        "validate", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.path={text_file}",
        "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--data.block_size=32",
        f"--ckpt_path={pretrained / 'checkpoints' / 'last.ckpt'}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--progress_bar.refresh_rate=0",
    )  # fmt: skip
    assert_ok(result)
    last_val = scalars(pretrained)["val/loss"][-1][1]
    # Lightning prints a plain table, or a rich one where `rich` is installed.
    reported = float(re.search(r"val/loss\W+([0-9.]+)", result.stdout).group(1))
    assert abs(reported - last_val) < 1e-4


COMMANDS = ["fit", "validate", "generate", "export", "serve", "evaluate", "tokenizer"]


def test_help_lists_every_command():
    result = main_in_process("--help")
    assert_ok(result)
    listed = re.search(r"\{([\w,]+)\}", result.stdout)
    assert listed is not None and listed.group(1).split(",") == COMMANDS, result.stdout
    tokenizer = main_in_process("tokenizer", "--help")
    assert_ok(tokenizer)
    assert "{train,evaluate}" in tokenizer.stdout


@pytest.mark.parametrize("command", [["generate"], ["export"], ["serve"], ["evaluate"], ["tokenizer", "train"],
                                     ["tokenizer", "evaluate"]])  # fmt: skip
def test_every_option_of_a_command_says_what_it_does(command: list[str]):
    # The options are the function's parameters, documented in its docstring: none is "Unused", none is bare.
    result = main_in_process(*command, "--help")
    assert_ok(result)
    assert "Unused" not in result.stdout and "seed_everything" not in result.stdout
    blocks = re.split(r"^  (?=--)", result.stdout.split("options:", 1)[1], flags=re.M)[1:]
    options = {block.split()[0]: " ".join(block.split()) for block in blocks}
    assert len(options) >= 4, result.stdout
    files = ("--help", "--config", "--print_config", "--trainer")  # jsonargparse's own, and a group's config file
    bare = [name for name, text in options.items() if name not in files and "type: " not in text]
    assert bare == [], f"options without help: {bare}"


def test_a_resume_takes_the_options_given_now_over_the_checkpoints_hyperparameters(
    pretrained: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # LightningCLI would parse the checkpoint's saved hyperparameters (learning_rate=1e-2) over the command line.
    from gpt_lightning.training.cli import GPTLightningCLI

    monkeypatch.setattr(sys, "argv", ["main.py"])
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    args = fit_args(text_file, tmp_path, f"--ckpt_path={ckpt}", "--model.learning_rate=5e-3", "--trainer.max_steps=40")
    resumed = GPTLightningCLI(args=args)  # at its last step already: nothing to train
    assert resumed.model.hparams["learning_rate"] == 5e-3
    assert resumed.config.fit.ckpt_path == str(ckpt)
