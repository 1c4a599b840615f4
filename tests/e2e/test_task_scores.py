"""Task scores during training: `--task_scores.tasks` logs val/<task>/<metric> at every validation, the
numbers `evaluate` gives for the same weights, on one process or split across DDP's."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_lightning.evaluation import evaluate
from tests.conftest import ROOT, WORDS, assert_ok, cli_env, make_play, scalars, tiny_fit


def choice_file(path: Path, n: int) -> Path:
    rng = random.Random(0)
    rows = [
        {
            "context": " ".join(rng.choices(WORDS, k=6)),
            "choices": [" " + w for w in rng.sample(WORDS, 4)],
            "label": k % 4,
        }
        for k in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def last_values(run: Path, task: str) -> dict[str, float]:
    curves = scalars(run)
    return {tag.rsplit("/", 1)[1]: events[-1][1] for tag, events in curves.items() if tag.startswith(f"val/{task}/")}


def evaluated(run: Path, task: str, limit: int) -> dict[str, float]:
    result = evaluate(str(run / "checkpoints" / "last.ckpt"), [task], limit=limit)
    return {name: m["value"] for name, m in result["tasks"][0]["metrics"].items()}


def test_task_scores_are_logged_at_each_validation_as_evaluate_scores_them(text_file: Path, play_corpus: Path,
                                                                           tmp_path: Path):  # fmt: skip
    tasks = ["--task_scores.tasks=[spelling, next-word]", "--task_scores.limit=40"]
    result = tiny_fit(text_file, tmp_path, "--trainer.max_steps=6", "--trainer.val_check_interval=3", *tasks,
                      in_process=True)  # fmt: skip
    assert_ok(result)
    run = tmp_path / "run" / "version_0"
    curves = scalars(run)
    assert [step for step, _ in curves["val/spelling/acc"]] == [2, 5]  # next to val/loss, at every validation
    assert [step for step, _ in curves["val/loss"]] == [2, 5]
    for task in ("spelling", "next-word"):
        logged, scored = last_values(run, task), evaluated(run, task, limit=40)
        assert logged.keys() == scored.keys() == {"acc", "acc_norm", "acc_norm_bytes"}
        assert logged == pytest.approx(scored, abs=1e-6)  # TensorBoard keeps float32


@pytest.mark.parametrize(
    ("task", "problem"),
    [("prose.txt", "is text for language modelling, which val/loss scores already"),
     ("odd.jsonl", "odd.jsonl line 1: the context has 1 character.* outside the model's .*vocabulary: '#'")],
)  # fmt: skip
def test_a_task_that_cannot_be_scored_during_training_stops_the_fit_before_it_starts(
    text_file: Path, tmp_path: Path, task: str, problem: str
):
    (tmp_path / "prose.txt").write_text("Some prose.\n", encoding="utf-8")
    (tmp_path / "odd.jsonl").write_text(json.dumps({"context": "# hash", "choices": [" a", " b"], "label": 0}) + "\n")
    result = tiny_fit(text_file, tmp_path, "--trainer.max_steps=2", f"--task_scores.tasks=[{tmp_path / task}]",
                      in_process=True)  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.search(problem, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "run" / "version_0" / "checkpoints").exists()


@pytest.mark.slow
def test_under_ddp_each_process_scores_its_share_and_the_scores_are_one_process_s(text_file: Path, tmp_path: Path):
    mc = choice_file(tmp_path / "mc.jsonl", 41)  # an odd count: the processes' shares differ in size
    ddp = ["--config", str(ROOT / "configs/trainer/ddp_cpu.yaml")]
    assert_ok(tiny_fit(text_file, tmp_path, *ddp, "--trainer.max_steps=4", "--trainer.val_check_interval=4",
                       f"--task_scores.tasks=[{mc}]", "--task_scores.limit=null"))  # fmt: skip
    run = tmp_path / "run" / "version_0"
    assert last_values(run, "mc") == pytest.approx(evaluated(run, str(mc), limit=41), abs=1e-6)


@pytest.mark.slow
def test_evaluate_under_torchrun_splits_the_items_and_records_what_one_process_records(pretrained: Path,
                                                                                      tmp_path: Path):  # fmt: skip
    # Odd counts: the two processes' shares differ in size, for every kind of task.
    mc = choice_file(tmp_path / "mc.jsonl", 13)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"The {w}", "answer": " and"}) + "\n" for w in WORDS[:7]))
    prose = tmp_path / "prose.txt"
    prose.write_text(make_play(30, seed=5), encoding="utf-8")
    ckpt = str(pretrained / "checkpoints" / "last.ckpt")
    script = tmp_path / "score.py"
    script.write_text("import sys\nfrom gpt_lightning.evaluation import evaluate\n"
                      "evaluate(sys.argv[1], sys.argv[3:], output=sys.argv[2], max_new_tokens=4)\n")  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               ckpt, str(tmp_path / "two.json"), str(mc), str(qa), str(prose)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=cli_env(PYTHONPATH=str(ROOT)))
    assert_ok(result)
    assert result.stdout.count("task ") == 1  # one table, printed by the first process
    one = evaluate(ckpt, [str(mc), str(qa), str(prose)], output=str(tmp_path / "one.json"), max_new_tokens=4)
    two = json.loads((tmp_path / "two.json").read_text())
    for record in (one, two):
        for task in record["tasks"]:
            task.pop("seconds")
    assert two == json.loads(json.dumps(one))  # the same record, number for number
