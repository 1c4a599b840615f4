"""What the benchmarks share: where the checkout and its recipes are, the recipes as `main.py fit --config`
reads them from configs/, the project's CLI built but not run, a run's TensorBoard scalars, device syncs and
memory readings, a fresh process for a measurement, and a byte-level BPE trained on a text.

Run a benchmark from the checkout's root as a module: `python -m benchmarks.<name> --help`.

Nothing here imports Lightning at module level: the benchmarks that measure a fresh process's memory
(encode_memory, gpt2_cpu) would count it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gpt_lightning.model import GPTConfig
from gpt_lightning.tokenizer import BPETokenizer
from gpt_lightning.tokenizer_training import train_tokenizer

if TYPE_CHECKING:
    from lightning.pytorch import Callback, Trainer

    from gpt_lightning.training.cli import GPTLightningCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# `--preset NAME`: the configs/ files of each recipe, layered in this order as `--config` options.
RECIPES: dict[str, tuple[str, ...]] = {
    "cpu": ("pretrain_cpu.yaml",),
    "cpu-nanogpt": ("pretrain_cpu_nanogpt.yaml",),
    "baby-gpt": ("pretrain.yaml",),
    "baby-gpt-muon": ("pretrain_muon.yaml",),  # unmeasured on a GPU so far
    "gpt2-small": ("pretrain.yaml", "model/gpt2_small.yaml"),
}


def recipe_files(preset: str) -> list[Path]:
    return [CONFIGS / name for name in RECIPES[preset]]


def config_args(files: Sequence[Path]) -> list[str]:
    """`--config FILE` for each file, for the CLI."""
    return [arg for file in files for arg in ("--config", str(file))]


def recipe_settings(files: Sequence[Path]) -> dict[str, Any]:
    """The settings of layered config files as the CLI reads them: a later file's keys replace an earlier
    one's, key by key, at every depth (what the files leave out takes the CLI's defaults)."""
    merged: dict[str, Any] = {}
    for file in files:
        _merge(merged, yaml.safe_load(file.read_text(encoding="utf-8")) or {})
    return merged


def _merge(into: dict[str, Any], layer: dict[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def recipe_model(preset: str, vocab_size: int = 65) -> GPTConfig:
    """The network a recipe trains: its model settings that are GPTConfig fields, and its data's context."""
    settings = recipe_settings(recipe_files(preset))
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    shape = {key: value for key, value in settings.get("model", {}).items() if key in fields}
    return GPTConfig(**{**shape, "vocab_size": vocab_size, "block_size": settings["data"]["block_size"]})


def recipe_cli(args: list[str]) -> GPTLightningCLI:
    """The project's CLI built from `args` as `main.py fit` builds it (module, data module, callbacks and
    logger), not run: the caller adds its callbacks and calls `cli.trainer.fit`."""
    from gpt_lightning.training.cli import GPTLightningCLI

    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads `args`, not the benchmark's own arguments
    try:
        return GPTLightningCLI(args=args, run=False)
    finally:
        sys.argv = argv


def callbacks_of(trainer: Trainer) -> list[Callback]:
    """The trainer's callbacks, to add to or look up: Lightning sets them outside `Trainer.__init__`, where mypy
    cannot see them."""
    return trainer.callbacks  # type: ignore[attr-defined]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run folder as {tag: [(step, value), ...]}, as TensorBoard shows them:
    the events of a tag orphaned by a restart are purged, the resumed run's steps replace them.

    The event files are read in the order they were written (their first event's wall time), not by name:
    two fits in one process and one second get names that sort by a counter as a string ("10" before "9")."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    def written_at(path: Path) -> float:
        return next(iter(EventFileLoader(str(path)).Load())).wall_time

    curves: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*"), key=written_at):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            events = [(e.step, e.value) for e in acc.Scalars(tag)]
            resumed_at = events[0][0]  # TensorBoard purges each tag from the step where it restarts
            curves[tag] = [(step, value) for step, value in curves.get(tag, []) if step < resumed_at] + events
    return curves


def resident_bytes() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes(pid: int | str = "self") -> int:
    """A process's resident memory high-water mark (VmHWM), in bytes (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def peak_resident_bytes_of_tree(pid: int) -> int:
    """The summed high-water marks of a process and its descendants (those still running)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += peak_resident_bytes(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def module_command(module: str, *args: str) -> list[str]:
    """The command line of a fresh process that runs `module` (benchmarks.<name>); give it `child_env()`."""
    return [sys.executable, "-m", module, *args]


def child_env(**variables: str) -> dict[str, str]:
    """This environment, for a fresh process that must import this checkout's packages from any folder."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **variables}


def fresh_process_output(module: str, *args: str) -> str:
    """What `python -m module args` prints, run in a fresh process: its peak memory is then its own."""
    command = module_command(module, *args)
    return subprocess.run(command, check=True, capture_output=True, text=True, env=child_env()).stdout


def trained_bpe(text: Path, vocab_size: int) -> BPETokenizer:
    """A byte-level BPE with GPT-2's settings (its pre-tokenizer, no special tokens, every pair seen may merge)
    trained by the project's own trainer on all of `text`: GPT-2's own cannot be downloaded here."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout keeps the tables
        trained = train_tokenizer(str(Path(tmp) / "tokenizer.json"), path=str(text), include_validation=True,
                                  vocab_size=vocab_size, special_tokens=(), min_frequency=1)  # fmt: skip
        return BPETokenizer.from_file(trained.path)
