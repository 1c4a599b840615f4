"""`evaluate`: score a model on tasks, print a table and record the scores, their sources and the settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch

from gpt_lightning.data.corpus import VAL_FRACTION, atomic_write_bytes, sha256_of
from gpt_lightning.data.instruct import Template, render_prompt
from gpt_lightning.data.synthetic_tasks import TEST_EXAMPLES, is_synthetic, synthetic_task
from gpt_lightning.evaluation.builtin import BUILTIN_TASKS, builtin_task
from gpt_lightning.evaluation.metrics import DESCRIPTIONS, Metric, choice_metrics, generation_metrics, text_metrics
from gpt_lightning.evaluation.scoring import encode_text, score_choices, score_generations, score_windows, text_windows
from gpt_lightning.evaluation.tasks import (
    DEFAULT_STOP,
    GenerationItem,
    GenerationTask,
    MultipleChoiceTask,
    Task,
    read_task,
    split_kind,
)
from gpt_lightning.model import GPT
from gpt_lightning.sources import load_model, open_source
from gpt_lightning.tokenizer import BPETokenizer, Tokenizer

RESULT_FORMAT = 1
_Score = TypeVar("_Score")


def resolve_task(spec: str, data_dir: str = "data", seed: int = 1337) -> Task:
    """A built-in task's name (made from the corpus under `data_dir` with `seed`), or a task file (`PATH` or
    `KIND:PATH`, see `tasks`)."""
    if spec in BUILTIN_TASKS:
        return builtin_task(spec, data_dir, seed)
    if is_synthetic(spec):
        return synthetic_test_task(spec, data_dir, seed)
    _, path = split_kind(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"task {spec} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor a file: check the path."
        )
    return read_task(spec)


def synthetic_test_task(spec: str, data_dir: str = "data", seed: int = 1337) -> GenerationTask:
    """The test split of a built-in synthetic task (synthetic_tasks: addition-2, addition-3, reverse-words[:PATH]),
    TEST_EXAMPLES problems at most, none of which its training and validation splits hold."""
    task = synthetic_task(spec, data_dir)
    examples = task.examples("test", TEST_EXAMPLES, seed)
    items = [GenerationItem(e.messages[0].content, e.messages[1].content, DEFAULT_STOP, e.where) for e in examples]
    items_json = json.dumps([dataclasses.asdict(item) for item in items], ensure_ascii=False)
    source = {"synthetic": spec, "split": "test", "seed": seed,
              "items_sha256": hashlib.sha256(items_json.encode()).hexdigest()}  # fmt: skip
    return GenerationTask(spec.partition(":")[0], items, source)


def evaluate(
    ckpt_path: str,
    tasks: list[str],
    output: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    device: str = "cpu",
    data_dir: str = "data",
    seed: int = 1337,
    ignore_case: bool = False,
    stride: int | None = None,
) -> dict[str, Any]:
    """Scores a model on tasks, prints a table (task, metric, value, stderr, n, chance) and returns the record
    that `output` receives. See docs/evaluation.md for the task formats and what each metric is.

    Args:
        ckpt_path: The model: one of our checkpoints (a LoRA fine-tune's too), a Hugging Face GPT-2 folder, or a
            hub name such as `gpt2`.
        tasks: What to score, in order: built-in tasks by name (spelling, next-word, next-line, who-speaks:
            multiple choice made from the corpus's held-out split; addition-2, addition-3, reverse-words[:PATH]:
            the test split of a task to fine-tune on, exact match), JSONL task files (multiple choice in
            HellaSwag's or the generic format, or generation with exact match; the kind is read from the
            fields), any other file as text for bits per byte, or `KIND:PATH` with KIND one of multiple_choice,
            generation, lm. Under torchrun, each process scores its share of every task's items.
        output: A JSON file to write the scores to, with the model's source and sha256, each task's source (a
            file's sha256; a built-in task's corpus sha256, generator and seed) and these settings. Never
            overwritten: an existing file is an error.
        limit: Score only the first `limit` items of each task (for a text, its first `limit` windows).
        batch_size: Rows per forward pass: the choices of one item, or a text's windows. A text's batch holds
            batch_size x block_size x vocab_size float32 logits (GPT-2 small, 8 windows: 1.6 GB).
        max_new_tokens: The most tokens a generation item decodes before it is compared.
        device: Where the model runs: cpu, cuda, cuda:1, mps.
        data_dir: The folder that holds (or receives) tinyshakespeare/input.txt, for the built-in tasks.
        seed: Seed of the built-in tasks' items (recorded). Scoring itself is deterministic: greedy, no sampling.
        ignore_case: Exact match ignores case (Unicode case-folding); by default case counts.
        stride: Tokens between the ends of consecutive windows over a text: unset, block_size (windows that do
            not overlap); smaller, sliding windows that give every token at least block_size - stride tokens of
            context, at block_size / stride times the cost.

    Returns:
        The record written to `output`: {"format", "model", "settings", "tasks": [{"name", "kind", "source",
        "n", "seconds", "metrics": {name: {"value", "stderr", "n", "chance", "description"}}}], "warnings"}.
    """
    _check_settings(tasks, output, limit, batch_size, max_new_tokens, stride)
    resolved = [resolve_task(spec, data_dir, seed) for spec in tasks]  # every task file read before the model loads
    names = [task.name for task in resolved]
    if len(set(names)) < len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"two tasks are named {', '.join(repeated)} (a file's name is its stem): rename a file.")
    device, joined = _join_torchrun_group(device)
    try:
        return _evaluate(ckpt_path, resolved, output, limit, batch_size, max_new_tokens, device, data_dir, seed,
                         ignore_case, stride)  # fmt: skip
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _join_torchrun_group(device: str) -> tuple[str, bool]:
    """Under torchrun (WORLD_SIZE > 1, no group yet), joins the process group, one process per device, and
    returns this process's device and True."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or torch.distributed.is_initialized():
        return device, False
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, True


def _evaluate(
    ckpt_path: str, resolved: list[Task], output: str | None, limit: int | None, batch_size: int,
    max_new_tokens: int, device: str, data_dir: str, seed: int, ignore_case: bool, stride: int | None,
) -> dict[str, Any]:  # fmt: skip
    model, tokenizer = load_model(ckpt_path, merge_lora=True)
    template = open_source(ckpt_path).template  # a fine-tune on task data answers in its template
    model.to(device)
    first_process = _rank_and_world_size()[0] == 0
    record_warnings = _held_out_warnings(ckpt_path, resolved)
    for message in record_warnings if first_process else []:
        warnings.warn(message, stacklevel=3)

    scored = []
    for task in resolved:
        started = time.perf_counter()
        metrics = score_task(model, tokenizer, task, limit, batch_size, max_new_tokens, ignore_case, stride, template)
        scored.append({
            "name": task.name, "kind": task.kind, "source": task.source, "n": metrics[0].n,
            "seconds": round(time.perf_counter() - started, 3),
            "metrics": {m.name: {k: v for k, v in m.to_dict().items() if k != "name"} for m in metrics},
        })  # fmt: skip
    settings = {"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "device": device,
                "data_dir": data_dir, "seed": seed, "ignore_case": ignore_case, "stride": stride}  # fmt: skip
    result = {"format": RESULT_FORMAT, "model": describe_model(ckpt_path, tokenizer), "settings": settings,
              "tasks": scored, "warnings": record_warnings}  # fmt: skip
    if not first_process:  # every process holds the same result; one prints it and writes it
        return result
    print(format_table(result))
    if output is not None:
        _write_new(Path(output), json.dumps(result, indent=1, ensure_ascii=False).encode("utf-8"))
        print(f"wrote {output}")
    return result


def score_task(
    model: GPT, tokenizer: Tokenizer, task: Task, limit: int | None = None, batch_size: int = 8,
    max_new_tokens: int = 32, ignore_case: bool = False, stride: int | None = None, template: Template | None = None,
) -> list[Metric]:  # fmt: skip
    """The metrics of one task on one model (the first `limit` items or windows). With a `template` (a fine-tune
    on task data), a generation item's prompt is rendered in it and its answer ends at the end marker too.

    In a torch.distributed process group (torchrun, a DDP run), each of the W processes scores every W-th item
    (or window) from its rank on, and every process returns the metrics of all of them, put back in order:
    the same numbers as one process's.
    """
    rank, world_size = _rank_and_world_size()
    if isinstance(task, MultipleChoiceTask):
        items = task.items[:limit]
        choices = score_choices(model, tokenizer, items[rank::world_size], batch_size)
        return choice_metrics(_in_order(choices, len(items), world_size))
    if isinstance(task, GenerationTask):
        prompts = task.items[:limit]
        if template is not None:
            prompts = [dataclasses.replace(item, prompt=render_prompt(template, item.prompt),
                                           stop=(*item.stop, template.end)) for item in prompts]  # fmt: skip
        generations = score_generations(model, tokenizer, prompts[rank::world_size], max_new_tokens, ignore_case)
        return generation_metrics(_in_order(generations, len(prompts), world_size))
    tokens = encode_text(tokenizer, task.text, f"task {task.name}")
    windows = text_windows(tokens.numel(), model.config.block_size, stride)[:limit]
    scored = score_windows(model, tokenizer, tokens, windows[rank::world_size], batch_size)
    return text_metrics(_in_order(scored, len(windows), world_size), tokenizer.vocab_size)


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _in_order(mine: list[_Score], total: int, world_size: int) -> list[_Score]:
    """Every process's scores, gathered (rank r scored items r, r + W, ...) and put back in item order."""
    if world_size == 1:
        return mine
    gathered: list[list[_Score]] = [[] for _ in range(world_size)]
    torch.distributed.all_gather_object(gathered, mine)
    return [gathered[i % world_size][i // world_size] for i in range(total)]


def _check_settings(
    tasks: list[str], output: str | None, limit: int | None, batch_size: int, max_new_tokens: int, stride: int | None
) -> None:
    if not tasks:
        raise ValueError(f"no tasks to evaluate: name built-in ones ({', '.join(BUILTIN_TASKS)}) or task files.")
    for name, value in (("limit", limit), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("stride", stride)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if output is not None and Path(output).exists():
        raise FileExistsError(f"{output} exists: write the scores to a new file; evaluate never overwrites one.")


def _write_new(path: Path, data: bytes) -> None:
    if path.exists():  # appeared while the model was scored
        raise FileExistsError(f"{path} exists: write the scores to a new file; evaluate never overwrites one.")
    atomic_write_bytes(path, data)


def describe_model(ckpt_path: str, tokenizer: Tokenizer) -> dict[str, Any]:
    """What the record says of the model: its source, the sha256 of its weights file, its step and shape."""
    facts = open_source(ckpt_path)
    weights = facts.hf_folder / "model.safetensors" if facts.hf_folder is not None else Path(ckpt_path)
    described: dict[str, Any] = {
        "source": ckpt_path,
        "sha256": sha256_of(weights) if weights.is_file() else None,
        "global_step": facts.global_step,
        "config": dataclasses.asdict(facts.config),
        "tokenizer": {"type": "char", "vocab_size": tokenizer.vocab_size},
        "lora": None if facts.lora is None else dataclasses.asdict(facts.lora),
    }
    if isinstance(tokenizer, BPETokenizer):
        described["tokenizer"] = {"type": "bpe", "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.fingerprint}
    return described


def held_out_overlap(trained_on: dict[str, Any] | None, corpus_sha256: str) -> str | None:
    """A warning when a checkpoint records training on (part of) the corpus's held-out split, which the
    built-in tasks are made of: their scores would then measure memory, not knowledge."""
    if not trained_on or trained_on.get("source_sha256") != corpus_sha256:
        return None  # other text, or a checkpoint that does not say
    selection = trained_on.get("selection") or {}
    start, end = selection.get("span") or (0.0, 1.0)
    # Where its training split ends, as a fraction of the corpus: exact for a span, an upper bound with speakers.
    train_end = start + (end - start) * (1.0 - float(trained_on.get("val_fraction", VAL_FRACTION)))
    if train_end <= 1.0 - VAL_FRACTION + 1e-9:
        return None
    return (
        f"the model trained on text of the corpus up to {train_end:.0%} of it (data.text_span {[start, end]}, "
        f"val_fraction {trained_on.get('val_fraction')}), within the built-in tasks' held-out split (the last "
        f"{VAL_FRACTION:.0%}): their scores measure memory as much as knowledge."
    )


def _held_out_warnings(ckpt_path: str, tasks: list[Task]) -> list[str]:
    corpora = {t.source["corpus_sha256"] for t in tasks if "builtin" in t.source}
    trained_on = open_source(ckpt_path).data
    return [message for sha in sorted(corpora) if (message := held_out_overlap(trained_on, sha)) is not None]


def format_table(result: dict[str, Any]) -> str:
    """The scores as a table, then a legend that says what each metric is."""
    rows = [("task", "metric", "value", "stderr", "n", "chance")]
    shown: list[str] = []
    for task in result["tasks"]:
        for name, metric in task["metrics"].items():
            rows.append((task["name"], name, f"{metric['value']:.4f}", _number(metric["stderr"]), str(metric["n"]),
                         _number(metric["chance"])))  # fmt: skip
            shown += [] if name in shown else [name]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:  # names to the left, numbers to the right
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    lines += ["", *(f"{name}: {DESCRIPTIONS[name]}" for name in shown)]
    lines += [f"warning: {message}" for message in result["warnings"]]
    return "\n".join(line.rstrip() for line in lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
