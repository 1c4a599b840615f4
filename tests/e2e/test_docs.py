"""The docs can't drift from the CLI: every `python main.py ...` command in the README and the guides
parses, as a user would paste it (--print_config parses and prints the whole config; nothing runs), and
every run folder or checkpoint they name is one that the recipe logging there writes."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, main_in_process

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(path: Path) -> list[str]:
    """The `python main.py` commands of a Markdown file's fenced bash blocks, continuation lines joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            # `pip install ... && python main.py ...`: the part that runs main.py
            for part in line.split("&&"):
                if part.strip().startswith("python main.py"):
                    found.append(part.strip())
    return found


CASES = [(path.relative_to(ROOT).as_posix(), command) for path in DOCS for command in commands(path)]


def test_the_docs_show_the_commands_that_matter():
    shown = [command for _, command in CASES]
    assert len(shown) >= 20
    for subcommand in ("fit", "validate", "generate", "export"):
        assert any(c.startswith(f"python main.py {subcommand} ") for c in shown), subcommand


@pytest.mark.parametrize(("doc", "command"), CASES, ids=[f"{d}: {c[15:70]}" for d, c in CASES])
def test_every_documented_command_parses(doc: str, command: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the checkout
    args = shlex.split(command, comments=True)[2:]  # after `python main.py`
    check = "--help" if args[0] in ("generate", "export", "serve") else "--print_config"
    result = main_in_process(*args, check)
    assert result.returncode == 0, f"{doc}: {command}\n{result.stderr[-2000:]}"


# A run folder or checkpoint the docs name: runs/<logger name>/version_N[/checkpoints/<file>.ckpt].
RUN_PATH = re.compile(r"runs/(?P<name>[\w.-]+)/version_\d+(?:/checkpoints/(?P<file>[\w.=-]+\.ckpt))?")
PATHS = sorted(
    {(path.relative_to(ROOT).as_posix(), m.group(0)) for path in DOCS for m in RUN_PATH.finditer(path.read_text())}
)


@functools.cache
def recipes() -> dict[str, dict]:
    """{logger name: the full config of the recipe that logs under it}, as the CLI prints it."""
    found = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if "fit" not in path.read_text():  # sampling defaults, not a recipe
            continue
        result = main_in_process("fit", "--config", str(path), "--print_config")
        assert result.returncode == 0, result.stderr[-2000:]
        config = yaml.safe_load(result.stdout)
        found[config["trainer"]["logger"]["init_args"]["name"]] = config
    return found


def checkpoints_written(config: dict) -> set[str]:
    """The checkpoint files a run of this config writes: last.ckpt, and the best one named after the step of a
    validation (every val_check_interval steps, and after the last step)."""
    trainer, template = config["trainer"], config["checkpoint"]["filename"]
    assert template == "best-{step}", f"this test knows checkpoint.filename best-{{step}} only, not {template}"
    interval, max_steps = trainer["val_check_interval"], trainer["max_steps"]
    assert isinstance(interval, int), "validation every n steps"
    steps = {*range(interval, max_steps + 1, interval), max_steps}
    return {"last.ckpt", *(f"best-step={step}.ckpt" for step in steps)}


def test_the_docs_name_run_folders_and_checkpoints():
    assert len(PATHS) >= 5
    assert any(
        m for _, p in PATHS if (m := RUN_PATH.fullmatch(p)) and m.group("file", "name") == ("last.ckpt", "pretrain_cpu")
    )


@pytest.mark.parametrize(("doc", "path"), PATHS, ids=[f"{d}: {p}" for d, p in PATHS])
def test_every_run_folder_and_checkpoint_the_docs_name_is_one_a_recipe_writes(doc: str, path: str):
    match = RUN_PATH.fullmatch(path)
    assert match is not None
    name, file = match.group("name", "file")
    assert name in recipes(), (
        f"{doc}: {path}: no recipe in configs/ logs to runs/{name} (they log to {sorted(recipes())})"
    )
    if file is not None:
        written = checkpoints_written(recipes()[name])
        assert file in written, f"{doc}: {path}: the {name} recipe writes {sorted(written)}, never {file}"


def test_the_readmes_pytest_runs_one_thread_per_worker_and_per_process_it_starts():
    # The workers share the cores (-n 2). A shell without OMP_NUM_THREADS must not give each worker, fit,
    # benchmark and notebook kernel a thread per core: oversubscribed, the suite ran 9:06 instead of 7:22.
    threads = os.environ.get("OMP_NUM_THREADS")
    assert threads is not None, "tests/conftest.py sets OMP_NUM_THREADS for the suite"
    assert torch.get_num_threads() == int(threads)
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert child.stdout.strip() == threads, child.stderr
