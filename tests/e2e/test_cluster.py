"""The paths cluster users take, end to end (in subprocesses wherever a process boundary matters):
preemption loops, extended runs, ordinary Lightning flags, exact validation under DDP, a NaN on one rank,
and torchrun launches (multi-node)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    ROOT,
    SHARED_CORPUS,
    TINY,
    assert_clean_error,
    assert_ok,
    cli,
    cli_env,
    fit_args,
    main_py,
    scalars,
    tiny_fit,
)

pytestmark = pytest.mark.slow

DDP_CPU = ["--config", str(ROOT / "configs/trainer/ddp_cpu.yaml")]


def lr_curve(run_dir: Path) -> list[tuple[int, float]]:
    logged = scalars(run_dir)
    return logged["train/lr"]


def test_resuming_the_same_checkpoint_again_and_again_then_training_longer(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A relative save_dir, as in the shipped configs; the checkpoint is then named in three other ways.
    # In this process (a fresh process per resume is tested in test_resume.py).
    monkeypatch.chdir(tmp_path)

    def fit(*args: str):
        return cli(*fit_args(text_file, Path("runs"), "--trainer.val_check_interval=10", *args), in_process=True)

    assert_ok(fit("--trainer.max_steps=20"))
    run = tmp_path / "runs" / "run" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    (tmp_path / "link").symlink_to(run / "checkpoints")
    lr_before = lr_curve(run)
    for ckpt in (str(last.resolve()), "./runs/run/version_0/checkpoints/last.ckpt", str(tmp_path / "link/last.ckpt")):
        assert_ok(fit("--trainer.max_steps=20", f"--ckpt_path={ckpt}"))  # preempted again before any new save
    assert_ok(fit("--trainer.max_steps=30", "--ckpt_path=last"))
    assert [p.name for p in (tmp_path / "runs" / "run").iterdir()] == ["version_0"]  # one run folder
    configs = sorted(p.name for p in run.glob("config*.yaml"))
    assert configs == ["config.resumed-at-step-20.2.yaml", "config.resumed-at-step-20.3.yaml",
                       "config.resumed-at-step-20.4.yaml", "config.resumed-at-step-20.yaml", "config.yaml"]  # fmt: skip
    assert [step for step, _ in scalars(run)["train/loss"]] == list(range(30))  # each step once
    # The schedule ended at step 20: training longer stays at min_lr instead of climbing a new cosine.
    lr_after = [lr for step, lr in lr_curve(run) if step >= 20]
    assert len(lr_after) == 10 and max(lr_after) <= lr_before[-1][1]


@pytest.mark.parametrize("flag", ["--trainer.log_every_n_steps=0", "--trainer.enable_progress_bar=false"])
def test_ordinary_lightning_flags_run_to_completion(text_file: Path, tmp_path: Path, flag: str):
    # A config that sets trainer.callbacks (rather than appending) keeps the project's own callbacks.
    config = tmp_path / "callbacks.yaml"
    config.write_text(f"trainer:\n  callbacks:\n    - class_path: tests.probe.RecordRank\n"
                      f"      init_args: {{out_dir: {tmp_path / 'probe'}}}\n")  # fmt: skip
    result = tiny_fit(text_file, tmp_path, "--config", str(config), "--trainer.max_steps=6",
                      "--trainer.val_check_interval=4", flag)  # fmt: skip
    assert_ok(result)
    run = tmp_path / "run" / "version_0"
    assert len(json.loads((tmp_path / "probe" / "rank0.json").read_text())["batches"]) == 6
    assert (run / "checkpoints" / "best-step=6.ckpt").is_file()  # FinalValidation is still there
    logged = scalars(run)
    if "log_every" in flag:
        assert "train/loss" not in logged and "train/tokens_per_sec" not in logged  # 0: no step metrics
    else:
        assert "it/s" not in result.stderr  # no tqdm in the job log
        assert len(logged["train/tokens_per_sec"]) == 6  # TokenThroughput is still there


def validated_loss(result: subprocess.CompletedProcess) -> float:
    assert_ok(result)
    return float(re.search(r"val/loss\s*\W\s*([0-9.]+)", result.stdout).group(1))


def test_validation_counts_every_window_once_on_any_world_size(pretrained: Path, text_file: Path, tmp_path: Path):
    text = text_file.read_text()
    windows = (len(text) - int(len(text) * 0.9) - 1) // 32
    assert windows % 3, "the test needs a window count that 3 processes cannot split evenly"
    args = ["validate", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.path={text_file}",
            f"--ckpt_path={pretrained / 'checkpoints' / 'last.ckpt'}", *TINY[:3], "--data.block_size=32",
            "--data.val_batch_size=7",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--progress_bar.refresh_rate=0"]  # fmt: skip
    one = validated_loss(cli(*args))
    three = validated_loss(cli(*args, "--trainer.devices=3", "--trainer.strategy=ddp"))
    assert abs(one - three) < 1e-6, (one, three)


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_error(text_file: Path, tmp_path: Path):
    result = tiny_fit(text_file, tmp_path, *DDP_CPU, "--trainer.max_steps=50", "--trainer.val_check_interval=50",
                      "--trainer.callbacks+=tests.probe.PoisonWeights", "--trainer.callbacks.at_step=3",
                      "--trainer.callbacks.rank=1", timeout=120)  # fmt: skip
    assert_clean_error(result, "the training loss became NaN or infinite at step 3")
    assert result.stderr.count("error: the training loss became NaN or infinite at step 3") == 2  # both ranks


# -- torchrun: how clusters launch --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, str(ROOT / "main.py")]


def corpus_fit(runs: Path, data_dir: Path, probe: Path, *args: str) -> list[str]:
    """The CPU recipe shrunk to TINY, on the corpus in data_dir, copied there from a local copy."""
    return ["fit", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.data_dir={data_dir}",
            f"--data.corpus_source={SHARED_CORPUS}", f"--trainer.logger.init_args.save_dir={runs}",
            "--trainer.logger.init_args.name=run", *TINY, "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu",
            "--trainer.callbacks+=tests.probe.RecordRank", f"--trainer.callbacks.out_dir={probe}", *args]  # fmt: skip


def run_all(commands: list[list[str]], timeout: float = 240) -> list[tuple[int, str]]:
    env = {k: v for k, v in cli_env().items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    return run_together([(command, env) for command in commands], timeout)


def run_together(commands: list[tuple[list[str], dict[str, str]]], timeout: float = 240) -> list[tuple[int, str]]:
    """Starts every (command, environment) at once and gives each one's exit code and output. The output goes to
    files, not pipes: a rank blocked on a full pipe that nobody reads would hold its peers up in a collective.
    Past the timeout, every process is killed with the processes it started (torchrun's workers), so that a hung
    run leaves nothing behind."""
    outputs = [tempfile.TemporaryFile("w+") for _ in commands]
    processes = [
        subprocess.Popen(command, cwd=Path.cwd(), env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for (command, env), out in zip(commands, outputs, strict=True)
    ]  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in processes]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = []
    for out in outputs:
        with out:
            out.seek(0)
            texts.append(out.read())
    if codes is None:  # what a hung run printed is what tells why it hung
        tails = "\n---\n".join(text[-2000:] for text in texts)
        pytest.fail(f"{len(commands)} processes did not all end within {timeout} s; their output ends:\n{tails}")
    return list(zip(codes, texts, strict=True))


def assert_one_ddp_run(runs: Path, probe: Path, world: int, steps: int) -> None:
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(len(r["batches"]) == steps for r in ranks)
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank draws its own data
    assert len({r["weights"] for r in ranks}) == 1  # and all end with the same weights
    assert [p.name for p in (runs / "run").iterdir()] == ["version_0"]
    assert len(list((runs / "run" / "version_0").glob("events.out.tfevents.*"))) == 1


@pytest.mark.skipif(not SHARED_CORPUS.is_file(), reason="needs the corpus copy in ../shared/data")
def test_two_nodes_launched_by_torchrun_train_one_run_and_resume(tmp_path: Path):
    runs, probe = tmp_path / "runs", tmp_path / "probe"

    def nodes(*args: str) -> list[list[str]]:
        port = str(free_port())
        return [
            torchrun("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                     f"--master_port={port}")
            + corpus_fit(runs, tmp_path / f"node{node}_data", probe, "--trainer.devices=1", "--trainer.num_nodes=2",
                         "--trainer.strategy=ddp", *args)
            for node in (0, 1)
        ]  # fmt: skip

    for code, output in run_all(nodes("--trainer.max_steps=4")):
        assert code == 0, output[-4000:]
    assert_one_ddp_run(runs, probe, world=2, steps=4)
    for node in (0, 1):  # each node's first process put the corpus in its own data_dir
        assert (
            tmp_path / f"node{node}_data" / "tinyshakespeare" / "input.txt"
        ).read_bytes() == SHARED_CORPUS.read_bytes()
    for code, output in run_all(nodes("--trainer.max_steps=6", "--ckpt_path=last")):
        assert code == 0, output[-4000:]
    last = runs / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    assert [step for step, _ in scalars(runs / "run" / "version_0")["train/loss"]] == list(range(6))


@pytest.mark.skipif(not SHARED_CORPUS.is_file(), reason="needs the corpus copy in ../shared/data")
def test_torchrun_standalone_on_one_node(tmp_path: Path):
    runs, probe = tmp_path / "runs", tmp_path / "probe"
    command = torchrun("--standalone", "--nproc_per_node=2") + corpus_fit(
        runs, tmp_path / "data", probe, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=4"
    )
    [(code, output)] = run_all([command])
    assert code == 0, output[-4000:]
    assert_one_ddp_run(runs, probe, world=2, steps=4)


@pytest.mark.skipif(not SHARED_CORPUS.is_file(), reason="needs the corpus copy in ../shared/data")
def test_two_nodes_sharing_one_cold_data_dir_build_it_once(tmp_path: Path):
    # As scripts/slurm_ddp.sbatch runs on a cluster: every node's first process prepares the same folder.
    runs, probe, shared = tmp_path / "runs", tmp_path / "probe", tmp_path / "shared_data"
    port = str(free_port())
    nodes = [
        torchrun("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                 f"--master_port={port}")
        + corpus_fit(runs, shared, probe, "--trainer.devices=1", "--trainer.num_nodes=2", "--trainer.strategy=ddp",
                     "--trainer.max_steps=2")
        for node in (0, 1)
    ]  # fmt: skip
    outputs = run_all(nodes)
    for code, output in outputs:
        assert code == 0, output[-4000:]
    assert sum(output.count("encoding the corpus") for _, output in outputs) == 1  # one build, not two
    assert_one_ddp_run(runs, probe, world=2, steps=2)
    assert (shared / "tinyshakespeare" / "input.txt").read_bytes() == SHARED_CORPUS.read_bytes()


def srun_like(tasks: int, *args: str) -> list[tuple[int, str]]:
    """`tasks` processes with the variables srun sets on one node, started together as srun starts them."""
    port = str(free_port())
    common = {"SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NNODES": "1",
              "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "gpt", "SLURM_NODELIST": "127.0.0.1",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
    env = {k: v for k, v in cli_env().items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    ranks = [{**env, **common, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)} for rank in range(tasks)]
    return run_together([(main_py(*args), rank_env) for rank_env in ranks])


def test_srun_ranks_from_slurm_variables_train_one_run(text_file: Path, tmp_path: Path):
    probe = tmp_path / "probe"
    args = fit_args(text_file, tmp_path / "runs", "--trainer.devices=2", "--trainer.strategy=ddp",
                    "--trainer.accelerator=cpu", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                    "--trainer.callbacks+=tests.probe.RecordRank", f"--trainer.callbacks.out_dir={probe}")  # fmt: skip
    for code, output in srun_like(2, *args):
        assert code == 0, output[-4000:]
    assert_one_ddp_run(tmp_path / "runs", probe, world=2, steps=3)


def test_a_data_error_on_local_rank_0_ends_every_rank_at_once_with_its_message(tmp_path: Path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    args = fit_args(bad, tmp_path / "runs", "--trainer.devices=2", "--trainer.strategy=ddp",
                    "--trainer.accelerator=cpu", "--trainer.max_steps=3")  # fmt: skip
    started = time.monotonic()
    results = srun_like(2, *args)
    assert time.monotonic() - started < 60  # not the hour a waiting rank used to poll for
    for code, output in results:
        assert code == 1 and re.search(r"error: data.path .*latin1.txt is not UTF-8: byte 3", output), output[-3000:]
