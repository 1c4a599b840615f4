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
    # Exactly these, for the CPU recipe (Muon for the blocks' matrices, AdamW for the rest): no `epoch` (the
    # stream is endless), one learning rate per schedule.
    expected = {"train/loss": 40, "val/loss": 2, "val/bpc": 2, "train/lr": 40, "train/lr_muon": 40,
                "train/tokens_per_sec": 40, "train/grad_norm": 40}  # fmt: skip
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


def test_learning_rate_charts_one_per_schedule(text_file: Path, tmp_path: Path):
    for optimizer in ("adamw", "muon"):
        assert_ok(tiny_fit(text_file, tmp_path, f"--model.optimizer={optimizer}", "--trainer.max_steps=3",
                           "--trainer.val_check_interval=3", name=optimizer, in_process=True))  # fmt: skip
    adamw, muon = (scalars(tmp_path / name / "version_0") for name in ("adamw", "muon"))
    base = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "val/loss", "val/bpc"}
    assert set(adamw) == base  # AdamW's two parameter groups share one chart
    assert set(muon) == base | {"train/lr_muon"}
    # One schedule drives both: Muon's 0.02 against TINY's AdamW 1e-2, at every step.
    assert [lr for _, lr in muon["train/lr_muon"]] == pytest.approx([2 * lr for _, lr in muon["train/lr"]])


def test_a_resume_within_the_same_second_reads_back_in_the_order_it_was_written(tmp_path: Path):
    # Event files are named events.out.tfevents.<second>.<host>.<pid>.<counter>: two fits in one process and
    # one second (a tiny resume in a test) sort by the counter as a string, "10" before "9". The curve must
    # still read as written: the resumed file's steps replace the orphaned ones, as TensorBoard purges them.
    from torch.utils.tensorboard import SummaryWriter

    def write(counter: int, steps: range, value: float) -> None:
        writer = SummaryWriter(str(tmp_path))
        for step in steps:
            writer.add_scalar("train/loss", value + step, step)
        writer.close()
        (written,) = [p for p in tmp_path.iterdir() if not p.name.startswith("events.out.tfevents.1700000000.")]
        written.rename(tmp_path / f"events.out.tfevents.1700000000.host.1.{counter}")

    write(9, range(0, 5), 0.0)
    time.sleep(0.01)
    write(10, range(3, 8), 100.0)
    assert scalars(tmp_path)["train/loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0),
                                               (5, 105.0), (6, 106.0), (7, 107.0)]  # fmt: skip
