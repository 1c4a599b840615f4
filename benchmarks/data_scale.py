"""How the data path scales with the size of the text: encode throughput, peak memory of a short fit
(1 process, and each of 2 DDP processes) and batch-gather throughput, for the memory-mapped token cache
and for the in-memory path it replaced (the whole text as a string, encoded into an int64 tensor by
every process), where that fits.

    python -m benchmarks.data_scale --sizes-mb 10 100 1000

It generates ASCII text of each size in a temporary folder (`--work-dir` to choose the disk), then runs
`main.py fit --config configs/pretrain_cpu.yaml --data.path FILE` for 5 steps with 2 validation
batches, as the data-path issue measures it. Peak memory is each process's high-water mark (VmHWM).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    CONFIGS,
    child_env,
    config_args,
    module_command,
    peak_resident_bytes,
    recipe_files,
    recipe_settings,
)
from gpt_lightning.data.corpus import RandomWindows, read_text
from gpt_lightning.data.token_cache import Selection, build_token_cache
from gpt_lightning.tokenizer import CharTokenizer
from gpt_lightning.training.datamodule import TextDataModule

WORDS = (
    "the and of to my in you is that not with be your his for this but have thou as so me will what him "
    "her all by shall do are our king lord good now love no more o let if then thy say come man sweet "
    "night day death life heaven earth blood crown sword fair noble gentle honour grace"
).split()
SHORT_FIT = ["--trainer.max_steps=5", "--trainer.val_check_interval=5", "--trainer.limit_val_batches=2"]


def generate_text(path: Path, size: int, seed: int = 0) -> None:
    """`size` bytes of play-shaped ASCII: a 4 MB block of random speeches, repeated, so that writing a
    gigabyte takes seconds. Repeated text is as hard to encode and to map as fresh text."""
    rng = random.Random(seed)
    speeches, length = [], 0
    while length < min(size, 4 << 20):
        n_lines = rng.randint(1, 4)
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(5, 10))).capitalize() + "." for _ in range(n_lines)]
        speeches.append(f"{rng.choice(['KING', 'QUEEN', 'FOOL', 'GHOST'])}:\n" + "\n".join(lines) + "\n\n")
        length += len(speeches[-1])
    block = "".join(speeches).encode("ascii")
    with path.open("wb") as f:
        for start in range(0, size, len(block)):
            f.write(block[: min(len(block), size - start)])


class InMemoryText:
    """The data path before the token cache, kept here to measure it: the whole text read as one string
    and encoded into an int64 tensor, by every process."""

    def __init__(self, path: str) -> None:
        text = read_text(path, "data.path")
        self.source_sha256 = hashlib.sha256(text.encode()).hexdigest()  # what a checkpoint records
        self.selection = Selection().to_dict()
        self.skipped: list[str] = []  # every file was read
        self.tokenizer = CharTokenizer.from_text(text)
        self.vocab = self.tokenizer.vocab
        self._tokens = self.tokenizer.encode(text)

    def tokens(self) -> torch.Tensor:
        return self._tokens


class PeakMemory(Callback):
    """Writes each rank's memory high-water mark when fit ends."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        peak_mb = peak_resident_bytes() / 2**20
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps({"peak_rss_mb": peak_mb}))


def child(path_kind: str, out_dir: str, cli_args: list[str]) -> None:
    """A short fit, run as `main.py fit` would run it (DDP re-launches this same command line)."""
    from gpt_lightning.training.cli import GPTLightningCLI

    if path_kind == "in-memory":

        def in_memory(self: TextDataModule) -> InMemoryText:
            return InMemoryText(str(self.path))

        prop = cached_property(in_memory)
        prop.__set_name__(TextDataModule, "token_cache")
        TextDataModule.token_cache = prop  # type: ignore[assignment]
    callback = ["--trainer.callbacks+=benchmarks.data_scale.PeakMemory", f"--trainer.callbacks.out_dir={out_dir}"]
    GPTLightningCLI(args=[*cli_args, *callback])


def short_fit(path_kind: str, text: Path, work: Path, ddp: bool, threads: int) -> list[float]:
    out_dir = work / f"peak-{path_kind}-{'ddp' if ddp else 'single'}-{text.stem}"
    args = ["fit", *config_args(recipe_files("cpu")), f"--data.path={text}",
            f"--data.cache_dir={work / 'cache'}", f"--trainer.logger.init_args.save_dir={work / 'runs'}",
            "--progress_bar.refresh_rate=0", "--trainer.enable_model_summary=false", *SHORT_FIT]  # fmt: skip
    if ddp:
        args += ["--config", str(CONFIGS / "trainer/ddp_cpu.yaml")]
    command = module_command("benchmarks.data_scale", "child", path_kind, str(out_dir), "--", *args)
    env = child_env(OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    if result.returncode != 0:
        raise RuntimeError(f"{path_kind} fit on {text.name} failed:\n{result.stderr[-3000:]}")
    return [json.loads(p.read_text())["peak_rss_mb"] for p in sorted(out_dir.glob("rank*.json"))]


def gather_rate(tokens: torch.Tensor, seconds: float = 1.0) -> float:
    """Training batches per second of the CPU recipe's shape (12 windows of 65 tokens)."""
    data = recipe_settings(recipe_files("cpu"))["data"]
    windows = RandomWindows(tokens, block_size=data["block_size"], batch_size=data["batch_size"], seed=0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        windows.batch(count)
        count += 1
    return count / (time.perf_counter() - start)


def measure(size_mb: float, work: Path, args: argparse.Namespace) -> list[dict]:
    size = int(size_mb * 1e6)
    text = work / f"text-{size_mb:g}MB.txt"
    generate_text(text, size)
    rows = []
    start = time.perf_counter()
    cache = build_token_cache(text, work / "cache")
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    build_token_cache(text, work / "cache")  # a second run: the cache is checked, then reused
    reuse_s = time.perf_counter() - start
    row = {"path": "token cache", "size_mb": size_mb, "encode_mb_s": size / 1e6 / encode_s,
           "reuse_s": reuse_s, "gather_per_s": gather_rate(cache.tokens())}  # fmt: skip
    row["fit_mb"] = short_fit("cache", text, work, ddp=False, threads=args.threads)[0]
    row["ddp_mb"] = max(short_fit("cache", text, work, ddp=True, threads=1)) if args.ddp else float("nan")
    rows.append(row)
    if size_mb <= args.in_memory_max_mb:
        start = time.perf_counter()
        in_memory = InMemoryText(str(text))
        encode_s = time.perf_counter() - start
        row = {"path": "in memory (before)", "size_mb": size_mb, "encode_mb_s": size / 1e6 / encode_s,
               "reuse_s": encode_s, "gather_per_s": gather_rate(in_memory.tokens())}  # fmt: skip
        del in_memory
        row["fit_mb"] = short_fit("in-memory", text, work, ddp=False, threads=args.threads)[0]
        row["ddp_mb"] = max(short_fit("in-memory", text, work, ddp=True, threads=1)) if args.ddp else float("nan")
        rows.append(row)
    text.unlink()
    for old in (work / "cache").glob("*"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        dash = sys.argv.index("--")
        child(sys.argv[2], sys.argv[3], sys.argv[dash + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--in-memory-max-mb", type=float, default=100,
                        help="measure the in-memory path up to this size (~15 bytes per character)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the single-process fit")
    parser.add_argument(
        "--ddp", action=argparse.BooleanOptionalAction, default=True, help="also fit with 2 DDP processes"
    )
    parser.add_argument("--work-dir", help="where to write the generated text and caches (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # encoding is single-threaded numpy; measure it on one core
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        (work / "cache").mkdir()
        print("| text | data path | encode (MB/s, 1 core) | second run: cache check (s) | fit peak RSS, 1 process (MB) "
              "| fit peak RSS, 2 DDP processes (MB each, max) | batch gather (batches/s) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for size_mb in args.sizes_mb:
            for r in measure(size_mb, work, args):
                reuse = f"{r['reuse_s']:.2f}" if r["path"] == "token cache" else "n/a (encodes again)"
                print(f"| {size_mb:g} MB | {r['path']} | {r['encode_mb_s']:.0f} | {reuse} | {r['fit_mb']:.0f} | "
                      f"{r['ddp_mb']:.0f} | {r['gather_per_s']:,.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
