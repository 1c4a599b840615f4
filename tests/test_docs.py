"""The docs can't drift from the CLI: every `python main.py ...` command in the README and the guides
parses, as a user would paste it (--print_config parses and prints the whole config; nothing runs)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

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
