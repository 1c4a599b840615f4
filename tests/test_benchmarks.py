"""The benchmark scripts run end to end on generated text and print what the README quotes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_throughput_benchmark_prints_a_round_per_turn_and_the_ratio_line(text_file: Path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/throughput.py"), "--preset=cpu", f"--data-path={text_file}",
         "--threads=1", "--rounds=3", "--steps=2", "--warmup=2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    number = r"\s+[\d,]+\s+[\d,]+\s+\d\.\d{3}\s+-?\d+\.\d{2}"
    assert [line.split()[0] for line in lines[2:-1]] == ["1", "2", "3", "median"]
    assert all(re.fullmatch(r"\s*\w+" + number, line) for line in lines[2:-1]), lines
    assert re.fullmatch(r"fit/plain tokens-per-second ratio: \d\.\d\d", lines[-1])
    assert not list(ROOT.glob("config.yaml")), "the benchmark must not write into the checkout"
