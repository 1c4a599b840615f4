"""Shared fixtures: generated text (never the corpus), tiny model settings, and subprocess helpers."""

from __future__ import annotations

import errno
import io
import os
import random
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest

# The suite's workers share the cores (addopts: -n 2): one thread each, in this process and in every process it
# starts (a fit, a benchmark, the notebook's kernel). Unset, each takes a thread per core and they oversubscribe
# the cores: the README's `pytest` ran 9:06 on 2 cores, against 7:22 with CI's OMP_NUM_THREADS=1. One that is
# set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 (after the line above, which torch reads when it starts)

from benchmarks.common import scalars  # noqa: F401 (the tests read runs as the benchmarks do)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # the verified corpus copy beside the checkout, where there is one
SHARED_CORPUS = SHARED_DATA / "tinyshakespeare" / "input.txt"

WORDS = (
    "the and of to my in you is that not with be your his for this but have thou as so me will what "
    "him her all by shall do are our king lord good now love no more o let if then thy say come man"
).split()
SPEAKERS = ["FIRST CITIZEN", "KING ARTHUR", "LADY BEATRICE", "SECOND WATCHMAN"]


def make_play(n_speeches: int, seed: int = 0) -> str:
    """Play-shaped text: 'NAME:' lines followed by lines of words, speeches split by blank lines."""
    rng = random.Random(seed)
    speeches = []
    for _ in range(n_speeches):
        lines = []
        for _ in range(rng.randint(1, 4)):
            words = rng.choices(WORDS, k=rng.randint(4, 9))
            lines.append(" ".join(words).capitalize() + rng.choice([",", ".", "!", "?", ";"]))
        speeches.append(f"{rng.choice(SPEAKERS)}:\n" + "\n".join(lines))
    return "\n\n".join(speeches) + "\n"


@pytest.fixture(autouse=True)
def _outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs from its own folder: a run that takes the defaults (runs/, data/) writes there, never
    into the checkout. (Subprocess runs name their folders; a test that needs the checkout chdirs there.)"""
    monkeypatch.chdir(tmp_path)


def _checkout_outputs() -> set[str]:
    return {str(p.relative_to(ROOT)) for folder in ("runs", "data/token_cache") for p in (ROOT / folder).glob("*")}


@pytest.fixture(autouse=True, scope="session")
def _checkout_left_alone():
    """Fails the session if a test left runs or token caches in the checkout (a user's own stay)."""
    before = _checkout_outputs()
    yield
    added = _checkout_outputs() - before
    assert not added, f"tests wrote into the checkout: {sorted(added)}"


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(make_play(400), encoding="utf-8")
    return path


# A model small enough that a CLI run is dominated by start-up, on text from `text_file`.
TINY = [
    "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.warmup_steps=2",
    "--model.learning_rate=1e-2", "--model.min_lr=1e-3",
    "--data.block_size=32", "--data.batch_size=8",
    "--trainer.log_every_n_steps=1", "--progress_bar.refresh_rate=0",
    "--trainer.enable_model_summary=false", "--sample.max_new_tokens=20",
]  # fmt: skip


def optimizer_args(choice: str) -> list[str]:
    """'adamw', 'muon' (its precision chosen for this machine) or 'muon fp32'."""
    name, *precision = choice.split()
    return [f"--model.optimizer={name}", *(f"--model.muon_precision={p}" for p in precision)]


def refuse_writes(monkeypatch: pytest.MonkeyPatch, refused: Callable[[Path], bool]) -> None:
    """As if this process could not write where `refused(path)` holds (tests run as root, whom chmod does not
    stop): creating, opening for writing, replacing or removing such a path raises PermissionError, through
    the os functions that mkdir, mkstemp, unlink and replace use. Reading still works."""

    def guard(name: str, writes: Callable[..., bool] = lambda *args, **kwargs: True) -> None:
        real = getattr(os, name)

        def refusing(path, *args, **kwargs):
            if not isinstance(path, int) and writes(*args, **kwargs) and refused(Path(os.fsdecode(path)).absolute()):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refusing)

    guard("open", lambda flags, *args, **kwargs: bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    for name in ("mkdir", "unlink", "rmdir", "replace", "rename"):
        guard(name)


def unwritable(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """`folder` and everything under it cannot be written (see `refuse_writes`)."""
    folder = folder.absolute()
    refuse_writes(monkeypatch, lambda path: path.is_relative_to(folder))


def main_py(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("GPT_LIGHTNING_TRACEBACK", None)
    return env


def cli(
    *args: str, timeout: float = 240, env: dict | None = None, in_process: bool = False
) -> subprocess.CompletedProcess:
    """Runs `python main.py ARGS` in a subprocess (as a user would, and as DDP requires), or `in_process`.
    Either way from the test's own folder (see `_outside_the_checkout`), so that defaults such as `runs/`
    and `data/` never land in the checkout; `main.py` is named by its absolute path."""
    if in_process:
        return main_in_process(*args, env=env)
    return subprocess.run(
        main_py(*args), cwd=Path.cwd(), env=cli_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )


def main_in_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python main.py ARGS` as this process: `main()`, the same code path, with its exit code, stdout and
    stderr, but without a new interpreter's ~8 s of importing torch and Lightning. Single-process runs only
    (DDP re-launches sys.argv). An exception that main() lets escape, a traceback for the user, fails the test.
    """
    from gpt_lightning.training.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    # The environment is restored afterwards: Lightning sets variables (PL_GLOBAL_SEED, ...) during a fit.
    with (
        mock.patch.dict(os.environ, env or {}),
        mock.patch.object(sys, "argv", main_py()[1:]),
        redirect_stdout(stdout),
        redirect_stderr(stderr),
    ):
        os.environ.pop("GPT_LIGHTNING_TRACEBACK", None)
        # One thread, as cli_env gives a subprocess: a run compared bit for bit with a subprocess run must
        # reduce its floats in the same order.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            main(list(args))
        except SystemExit as exit_:
            returncode = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(main_py(*args), returncode, stdout.getvalue(), stderr.getvalue())


def fit_args(text_file: Path, runs: Path, *args: str, name: str = "run") -> list[str]:
    """`fit` with the CPU recipe shrunk to TINY, on `text_file`, logging to runs/name/version_N."""
    return [
        "fit", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.path={text_file}",
        f"--data.cache_dir={runs}/token_cache",
        f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.logger.init_args.name={name}",
        *TINY, *args,
    ]  # fmt: skip


def tiny_fit(text_file: Path, runs: Path, *args: str, name: str = "run", **kwargs) -> subprocess.CompletedProcess:
    return cli(*fit_args(text_file, runs, *args, name=name), **kwargs)


def finetune(pretrained: Path, text_file: Path, runs: Path, *args: str, in_process: bool = True):
    """`fit` with configs/finetune.yaml on the CPU preset, LoRA rank 8 (`--model.lora.rank=0`: full fine-tuning),
    on `text_file`, logging to runs/finetune/version_N. The start (`--model.init_from`) is the caller's."""
    configs = ["--config", str(ROOT / "configs/finetune.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml")]
    return cli("fit", *configs, f"--data.path={text_file}", "--data.speakers=null",
               f"--data.cache_dir={runs}/token_cache", f"--trainer.logger.init_args.save_dir={runs}",
               "--progress_bar.refresh_rate=0", "--trainer.enable_model_summary=false", "--model.lora.rank=8",
               *args, in_process=in_process)  # fmt: skip


def text_samples(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["tensors"] if t.startswith("samples")]
    return [e.tensor_proto.string_val[0].decode() for t in tags for e in acc.Tensors(t)]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )


@pytest.fixture(scope="session")
def pretraining(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One tiny pre-training run (40 steps) shared by the end-to-end tests: its run folder, and what
    `python main.py fit` printed."""
    runs = tmp_path_factory.mktemp("runs")
    result = tiny_fit(text_file, runs, "--trainer.max_steps=40", "--trainer.val_check_interval=20", name="pretrain")
    assert_ok(result)
    return runs / "pretrain" / "version_0", result


@pytest.fixture(scope="session")
def pretrained(pretraining: tuple[Path, subprocess.CompletedProcess]) -> Path:
    """The run folder of `pretraining`."""
    return pretraining[0]


@pytest.fixture
def play_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A generated play standing in for tiny Shakespeare (the built-in tasks read it through ensure_corpus)."""
    import gpt_lightning.evaluation.builtin as builtin

    path = tmp_path / "play.txt"
    path.write_text(make_play(2000, seed=3), encoding="utf-8")
    monkeypatch.setattr(builtin, "ensure_corpus", lambda data_dir, **kwargs: path)
    return path


def assert_clean_error(result: subprocess.CompletedProcess, *patterns: str) -> None:
    """Failed with a message naming the problem, and no traceback."""
    import re

    assert result.returncode != 0, f"expected a failure\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    for pattern in patterns:
        assert re.search(pattern, result.stderr), f"{pattern!r} not in stderr:\n{result.stderr[-3000:]}"
