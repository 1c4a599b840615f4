"""What a user reads in the terminal: a fit ends with a summary of its run, messages never land glued to the
progress bar, `validate` writes nothing, and Lightning's lines that tell a user nothing are left out."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_ok, cli, fit_args, main_in_process, scalars

# Lightning prints these on every run: an advertisement, and whether a GPU or TPU exists.
NOISE = ["💡 Tip", "litlogger", "GPU available: ", "TPU available: "]


def screen_lines(output: str) -> list[str]:
    """The lines a terminal shows: each line as the text after its last carriage return (tqdm redraws its bar
    in place, and clears it with one before a message)."""
    return [line.split("\r")[-1] for line in output.split("\n")]


def summary_field(stderr: str, label: str) -> str:
    match = re.search(rf"^  {re.escape(label)} +(.+)$", "\n".join(screen_lines(stderr)), flags=re.M)
    assert match, f"no {label!r} line in the summary:\n{stderr[-3000:]}"
    return match.group(1)


@pytest.mark.slow
def test_a_fit_ends_with_a_summary_of_its_run(text_file: Path, tmp_path: Path):
    args = fit_args(text_file, tmp_path, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                    "--progress_bar.refresh_rate=1")  # fmt: skip
    result = cli(*args, in_process=True)
    assert_ok(result)
    lines = screen_lines(result.stderr)
    # Lightning's own line, on a line of its own: not glued to the end of the progress bar.
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in lines, result.stderr[-3000:]
    run = tmp_path / "run" / "version_0"
    assert f"Finished at step 4. Run folder: {run}" in lines, result.stderr[-3000:]
    last = Path(summary_field(result.stderr, "last.ckpt"))
    best, best_loss = re.fullmatch(r"(.+) \(val/loss (\S+)\)", summary_field(result.stderr, "best")).groups()
    assert last == run / "checkpoints" / "last.ckpt" and last.is_file()
    assert Path(best) == run / "checkpoints" / "best-step=4.ckpt" and Path(best).is_file()
    logged = scalars(run)
    loss, bpc = logged["val/loss"][-1][1], logged["val/bpc"][-1][1]
    assert logged["val/loss"][-1][0] == 3  # the validation after the last step (logged under step - 1)
    validation = summary_field(result.stderr, "validation")
    assert validation == f"val/loss {loss:.4f}, val/bpc {bpc:.4f} (at step 4, the whole validation split)"
    assert best_loss == f"{min(v for _, v in logged['val/loss']):.4f}"
    generate = summary_field(result.stderr, "sample it")
    assert generate == f"python main.py generate --ckpt_path {shlex.quote(best)}"
    assert summary_field(result.stderr, "see its curves") == f"tensorboard --logdir {shlex.quote(str(run))}"
    # The command printed is one that runs.
    sampled = main_in_process(*shlex.split(generate)[2:], "--max_new_tokens=5")
    assert_ok(sampled)
    # Nothing that tells the user nothing; Lightning's other messages still show.
    assert "Seed set to 1337" in result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, noise


@pytest.mark.slow
def test_a_fit_in_a_new_process_prints_its_summary_and_no_noise(pretraining: tuple[Path, subprocess.CompletedProcess]):
    run, result = pretraining
    assert f"tensorboard --logdir {shlex.quote(str(run))}" in result.stderr
    assert "Seed set to 1337" in result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, noise


@pytest.mark.slow
def test_validate_prints_its_scores_and_writes_nothing(pretrained: Path, text_file: Path, tmp_path: Path):
    runs = pretrained.parent.parent

    def tree() -> set[str]:
        return {str(p.relative_to(runs)) for p in runs.rglob("*") if "token_cache" not in p.parts}

    before = tree()
    # As the README's `validate`: the recipe's logger is the one that wrote the checkpoint's run.
    result = cli(
        "validate", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.path={text_file}",
        f"--data.cache_dir={runs}/token_cache", f"--ckpt_path={pretrained / 'checkpoints' / 'best-step=40.ckpt'}",
        f"--trainer.logger.init_args.save_dir={runs}", "--trainer.logger.init_args.name=pretrain",
        "--progress_bar.refresh_rate=0",
    )  # fmt: skip
    assert_ok(result)
    assert re.search(r"val/loss\W+[0-9.]+", result.stdout) and re.search(r"val/bpc\W+[0-9.]+", result.stdout)
    assert tree() == before  # no new version folder, nothing added to the checkpoint's own run
    assert list(tmp_path.iterdir()) == []  # nor in the folder it ran from (a config.yaml, lightning_logs/)
    # No warning from Lightning: not that the checkpoint's folder changed, nor that its callbacks are missing.
    assert "dirpath has changed" not in result.stderr and "/lightning/" not in result.stderr, result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, noise


def test_only_lines_that_tell_a_user_nothing_are_left_out(capsys: pytest.CaptureFixture[str]):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

    from gpt_lightning.training.cli import clean_console

    with clean_console(), pytest.warns(UserWarning, match="GPU available but not used"):
        rank_zero_info("GPU available: True (cuda), used: False")
        rank_zero_info("TPU available: False, using: 0 TPU cores")
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero_info("Restoring states from the checkpoint path at x.ckpt")
        rank_zero_warn("GPU available but not used. You can set it by doing `Trainer(accelerator='gpu')`.")
    assert capsys.readouterr().err == "Restoring states from the checkpoint path at x.ckpt\n"
