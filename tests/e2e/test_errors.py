"""Bad input fails with a short message that names the problem and the fix: no traceback, exit code not 0.

The cases run `main()` in this process (`in_process=True`: the code path of `python main.py`, without a new
interpreter's imports); the missing corpus runs as a real subprocess, so the exit code and stderr a user
sees are checked once end to end (so are generate's, in test_generate_cli.py)."""

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_clean_error, cli, optimizer_args, refuse_writes, tiny_fit, unwritable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = {
        "empty": folder / "empty.txt",
        "latin1": folder / "latin1.txt",
        "short": folder / "short.txt",
        "alien": folder / "alien.txt",
        "junk": folder / "junk.ckpt",
    }
    paths["empty"].write_text("")
    paths["latin1"].write_bytes("KING ARTHUR:\nCafé au lait.\n".encode("latin-1") * 100)
    paths["short"].write_text("KING ARTHUR:\nHo.\n" * 3)
    paths["alien"].write_text("KING ARTHUR:\nZzyzx ~ {qux} \u00e9\n" * 200)
    paths["junk"].write_bytes(b"definitely not a checkpoint")
    bad_corpus = folder / "bad_corpus" / "tinyshakespeare" / "input.txt"
    bad_corpus.parent.mkdir(parents=True)
    bad_corpus.write_text("First Citizen:\nA truncated copy.\n")
    paths["bad_corpus_dir"] = folder / "bad_corpus"
    paths["empty_dir"] = folder / "no_corpus"
    return paths


@pytest.mark.parametrize(
    ("args", "patterns"),
    [
        (["--model.n_head=5"], [r"n_embd \(32\) must be divisible by n_head \(5\)", "use n_embd 30 or 35"]),
        (["--model.n_layer=0"], ["n_layer must be a positive integer"]),
        (["--model.dropout=1.0"], [r"dropout must be in \[0, 1\)"]),
        (["--data.block_size=100000"], ["fewer than block_size", "use a smaller block_size"]),
        (["--data.batch_size=0"], ["data.batch_size must be >= 1, got 0"]),
        (["--data.batch_size=100000"], ["batch_size 100000 does not fit the data", "Lower batch_size"]),
        (["--model.n_layers=3"], ["n_layers"]),  # unknown key: LightningCLI names it
        (["--model.n_layer=three"], ["n_layer"]),  # wrong type
        (["--ckpt_path=nowhere.ckpt"], ["--ckpt_path nowhere.ckpt does not exist"]),
        (["--ckpt_path=last"], ["no last.ckpt under"]),
        (["--sample.prompt=~"], [r"sample.prompt has 1 character\(s\) outside"]),
        (["--sample.top_p=0"], [r"top_p must be in \(0, 1\]"]),
    ],
)
def test_bad_training_input(text_file: Path, tmp_path: Path, args, patterns):
    assert_clean_error(tiny_fit(text_file, tmp_path, "--trainer.max_steps=2", *args, in_process=True), *patterns)


@pytest.mark.parametrize(
    ("name", "patterns"),
    [
        ("missing", ["data.path .*missing.txt does not exist"]),
        ("empty", ["data.path .*empty.txt is empty"]),
        ("latin1", ["data.path .*latin1.txt is not UTF-8", "iconv"]),
        ("short", ["fewer than block_size"]),
    ],
)
def test_bad_text_files(files, tmp_path: Path, name, patterns):
    path = files.get(name, tmp_path / "missing.txt")
    assert_clean_error(tiny_fit(path, tmp_path, "--trainer.max_steps=2", in_process=True), *patterns)


def test_a_corrupted_corpus_is_reported_never_trained_on(files, tmp_path: Path):
    recipe = str(ROOT / "configs/pretrain_cpu.yaml")
    result = cli("fit", "--config", recipe, f"--data.data_dir={files['bad_corpus_dir']}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=2",
                 in_process=True)  # fmt: skip
    assert_clean_error(result, "is not the tiny Shakespeare corpus: its sha256 is", "Delete it")
    assert not (tmp_path / "pretrain_cpu").exists() or not list((tmp_path / "pretrain_cpu").rglob("*.ckpt"))


def test_a_missing_corpus_without_network_says_where_to_put_it(files, tmp_path: Path):
    result = cli("fit", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.data_dir={files['empty_dir']}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=2",
                 env={"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})  # fmt: skip
    assert_clean_error(result, "could not download tiny Shakespeare", "copy input.txt", "tinyshakespeare/input.txt")


def finetune(pretrained: Path, tmp_path: Path, *args: str):
    return cli(
        "fit", "--config", str(ROOT / "configs/finetune.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml"),
        f"--model.init_from={pretrained / 'checkpoints' / 'last.ckpt'}", "--data.speakers=null",
        "--data.text_span=null", f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=2", *args,
        in_process=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "patterns"),
    [
        (
            ["--data.path={alien}"],
            [r"fine-tuning text .* has 7 character\(s\) outside .*'q', 'x', 'z', '\{', '\}', '~', 'é'"],
        ),
        (["--data.path={text}", "--model.init_from={junk}"], ["junk.ckpt is not a readable PyTorch checkpoint"]),
        (["--data.path={text}", "--model.init_from=missing.ckpt"], ["checkpoint missing.ckpt does not exist"]),
        (["--data.path={text}", "--model.n_layer=3"], [r"another architecture: model.n_layer=3 \(checkpoint: 2\)"]),
        (
            ["--data.path={text}", "--data.block_size=16"],
            [r"another architecture: data.block_size=16 \(checkpoint: 32"],
        ),
        # Padding is not architecture (a fine-tune may re-pad), but no padding can hold fewer rows than tokens.
        (
            ["--data.path={text}", "--model.vocab_size=10"],
            [r"model.vocab_size 10 is less than the tokenizer's \d+ tokens"],
        ),
        (  # your own text with the default target's selection: The Tempest's cast, in the last tenth
            ["--data.path={text}", "--data.speakers=[PROSPERO, MIRANDA]", "--data.text_span=[0.9, 1.0]"],
            [
                r"no speeches by PROSPERO, MIRANDA in data.path .*play.txt within data.text_span \[0.9, 1.0\]",
                "--data.speakers null",
                "--data.text_span null",
            ],
        ),
    ],
)
def test_bad_fine_tuning_input(pretrained: Path, files, text_file: Path, tmp_path: Path, args, patterns):
    args = [a.format(alien=files["alien"], junk=files["junk"], text=text_file) for a in args]
    assert_clean_error(finetune(pretrained, tmp_path, *args), *patterns)


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "muon fp32"])
def test_a_non_finite_loss_stops_training_without_saving_it(text_file: Path, tmp_path: Path, optimizer: str):
    # Losses are tested in batches, at logging steps and before saves: the NaN of step 6 is found when
    # last.ckpt is about to be written at step 8, and reported with its own step.
    result = tiny_fit(text_file, tmp_path, *optimizer_args(optimizer),
                      "--trainer.max_steps=50", "--trainer.val_check_interval=50",
                      "--trainer.log_every_n_steps=5", "--last_checkpoint.every_n_train_steps=4",
                      "--trainer.callbacks+=tests.probe.PoisonWeights", "--trainer.callbacks.at_step=6",
                      in_process=True)  # fmt: skip
    assert_clean_error(
        result, "the training loss became NaN or infinite at step 6", "last good checkpoint is .*last.ckpt"
    )
    import torch

    last = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


@pytest.mark.parametrize(
    ("case", "patterns"),
    [
        ("data_dir is a file", [r"data.data_dir .*notafile is a file, not a folder\. Point it at a folder"]),
        ("data_dir lies in a file", [r"data.data_dir .*notafile/data cannot be a folder: .*notafile is a file"]),
        ("cache_dir is a file", [r"data.cache_dir .*notafile is a file, not a folder"]),
        ("the corpus is a folder", [r"Is a directory: .*tinyshakespeare/input.txt", "data.data_dir"]),
        ("cache_dir is unwritable", [r"Permission denied: .*unwritable", "data.cache_dir"]),
        ("the failure marker is unwritable", [r"data.path .*empty.txt is empty"]),  # the error it would record
        ("the disk is full", ["no space left to write the token cache in .*c/short-", "Nothing was written"]),
    ],
)
def test_a_data_location_that_cannot_be_used_is_one_line_that_names_it(files, tmp_path: Path, monkeypatch, case,
                                                                        patterns):  # fmt: skip
    (tmp_path / "notafile").write_text("a file, not a folder")
    args = {
        "data_dir is a file": ["--data.data_dir=notafile"],
        "data_dir lies in a file": ["--data.data_dir=notafile/data"],
        "cache_dir is a file": [f"--data.path={files['short']}", "--data.cache_dir=notafile"],
        "the corpus is a folder": [f"--data.data_dir={tmp_path / 'corpus'}"],
        "cache_dir is unwritable": [f"--data.path={files['short']}", f"--data.cache_dir={tmp_path / 'unwritable'}"],
        "the failure marker is unwritable": [f"--data.path={files['empty']}", f"--data.cache_dir={tmp_path / 'c'}"],
        "the disk is full": [f"--data.path={files['short']}", f"--data.cache_dir={tmp_path / 'c'}"],
    }[case]
    if case == "the corpus is a folder":
        (tmp_path / "corpus" / "tinyshakespeare" / "input.txt").mkdir(parents=True)
    elif case == "cache_dir is unwritable":
        (tmp_path / "unwritable").mkdir()
        unwritable(monkeypatch, tmp_path / "unwritable")
    elif case == "the failure marker is unwritable":  # removing an earlier launch's and recording this one fail
        refuse_writes(monkeypatch, lambda path: ".failed.json" in path.name)
    elif case == "the disk is full":

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)
    result = cli("fit", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), *args,
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.max_steps=2",
                 in_process=True)  # fmt: skip
    assert_clean_error(result, *patterns)
