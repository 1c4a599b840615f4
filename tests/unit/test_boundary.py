"""Everything outside the Lightning shell (gpt_lightning/training/) is plain PyTorch: importing it must not import
Lightning. And the package has no import cycle."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gpt_lightning"
SHELL = "training"  # the Lightning shell: the only folder that may import Lightning
# The data modules' class paths of configs from before the layer folders, kept working (they import the shell).
OLD_CLASS_PATHS = ("datamodule", "task_datamodule")
EXTRAS = ("evaluation.lm_eval_adapter",)  # imports an optional extra (lm_eval), checked in tests/e2e/test_lm_eval.py
PLAIN = sorted(
    ".".join(("gpt_lightning", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
    if path.relative_to(PACKAGE).parts[0] != SHELL
    and ".".join(path.relative_to(PACKAGE).with_suffix("").parts) not in (*OLD_CLASS_PATHS, *EXTRAS)
)


def test_plain_modules_do_not_import_lightning():
    code = (
        f"import sys; import {', '.join(PLAIN)}; "
        "wrappers = {'lightning', 'pytorch_lightning', 'torchmetrics'}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in wrappers); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"Lightning imported by the plain modules: {result.stdout}{result.stderr}"


def _package_imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, read from the source (function-level imports included)."""
    package = PACKAGE
    modules = {
        ".".join(("gpt_lightning", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in package.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            imported |= {m for m in candidates if m in modules and m != name}
        graph[name] = imported
    return graph


def test_the_package_has_no_import_cycle():
    graph = _package_imports()
    assert "gpt_lightning.training.cli" in graph and graph["gpt_lightning.training.cli"], (
        "the import graph was not read"
    )
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles inside the package: {cycles}"
