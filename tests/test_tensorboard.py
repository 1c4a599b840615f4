"""TensorBoard itself serves a finished run: the scalars a user looks at, with the right number of points."""

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import assert_ok, scalars, tiny_fit

pytestmark = pytest.mark.slow


@pytest.fixture
def server(pretrained: Path):
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(pretrained), "--host", "127.0.0.1",
         "--port", "0", "--load_fast", "false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline, output = time.monotonic() + 60, ""
        while (match := re.search(r"http://127\.0\.0\.1:(\d+)/", output)) is None:
            assert time.monotonic() < deadline and process.poll() is None, f"TensorBoard did not start:\n{output}"
            output += process.stdout.readline()
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_runs_scalars(server: str):
    deadline = time.monotonic() + 60
    while not (tags := get(f"{server}/data/plugin/scalars/tags")) and time.monotonic() < deadline:
        time.sleep(0.5)  # the first load of the run is asynchronous
    (run,) = tags
    # Exactly these: no `epoch` (the stream is endless), one learning rate for AdamW's two groups.
    expected = {"train/loss": 40, "val/loss": 2, "val/bpc": 2, "train/lr": 40, "train/tokens_per_sec": 40,
                "train/grad_norm": 40}  # fmt: skip
    assert set(tags[run]) == set(expected)
    steps = {}
    for tag, points in expected.items():
        query = urllib.parse.urlencode({"run": run, "tag": tag})
        series = get(f"{server}/data/plugin/scalars/scalars?{query}")
        assert len(series) == points, tag
        steps[tag] = [step for _, step, _ in series]
        assert steps[tag] == sorted(set(steps[tag])), tag
    # A logging step's scalars share its step number, however each one reaches the logger.
    assert steps["train/tokens_per_sec"] == steps["train/loss"] == steps["train/grad_norm"] == steps["train/lr"]
    layout = get(f"{server}/data/plugin/custom_scalars/layout")
    charts = [chart for category in layout["category"] for chart in category["chart"]]
    assert any(chart["multiline"]["tag"] == ["train/loss", "val/loss"] for chart in charts)


def test_a_muon_run_logs_one_learning_rate_per_schedule(text_file: Path, tmp_path: Path):
    assert_ok(tiny_fit(text_file, tmp_path, "--model.optimizer=muon", "--trainer.max_steps=3",
                       "--trainer.val_check_interval=3", in_process=True))  # fmt: skip
    logged = scalars(tmp_path / "run" / "version_0")
    assert set(logged) == {"train/loss", "train/lr", "train/lr_muon", "train/grad_norm", "train/tokens_per_sec",
                           "val/loss", "val/bpc"}  # fmt: skip
    # One schedule drives both: Muon's 0.02 against TINY's AdamW 1e-2, at every step.
    assert [lr for _, lr in logged["train/lr_muon"]] == pytest.approx([2 * lr for _, lr in logged["train/lr"]])
