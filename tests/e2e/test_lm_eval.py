"""lm-evaluation-harness through the gpt_lightning adapter, offline: a tiny BPE model and local JSONL tasks defined
by lm-eval task YAMLs written here. Our `evaluate`, lm-eval through the adapter and lm-eval's own `hf` model on
the exported folder give one accuracy; the adapter's rolling log-likelihood and greedy generation are our text
scoring's and `greedy_until`'s."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt_lightning.evaluation import evaluate, read_task, score_choices, score_text, text_metrics
from gpt_lightning.evaluation.scoring import greedy_until
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sources import METADATA_KEY, load_model, metadata
from gpt_lightning.tokenizer import BPETokenizer
from tests.conftest import WORDS, assert_ok, cli, cli_env, make_play
from tests.unit.test_hf import train_bpe

# lm-eval is imported by the tests that run, never at collection (a second of every worker's start).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness is the eval extra, not installed: pip install -e '.[eval]'",
)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One of our checkpoints: a 2-layer GPT over a 300-token byte-level BPE, weights drawn far from uniform so
    that an off-by-one token or position changes the scores."""
    folder = tmp_path_factory.mktemp("bpe-model")
    tokenizer = BPETokenizer.from_file(train_bpe(folder / "tokenizer.json"))
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    state = {f"gpt.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 3, METADATA_KEY: metadata(config, tokenizer)}, folder / "m.ckpt")
    return folder / "m.ckpt"


def write_task(folder: Path, name: str, rows: list[dict[str, Any]], **config: Any) -> Path:
    """`name`.jsonl and an lm-eval task YAML (`name`.yaml) that reads it from the local file, offline."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data)}, "cache_dir": str(folder / "hf-datasets")},
        "validation_split": "validation",
        **config,
    }
    (folder / f"{name}.yaml").write_text(json.dumps(task, indent=1), encoding="utf-8")  # JSON is YAML
    return data


def metric(name: str, aggregation: str = "mean", higher_is_better: bool = True) -> dict[str, Any]:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def run_lm_eval(tasks: Path, task: str, model: str, model_args: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of one task of the folder `tasks` (its --include_path), in this process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import gpt_lightning.evaluation.lm_eval_adapter  # noqa: F401  registers the gpt_lightning model

    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # lm-eval's hundreds of tasks: 4 s
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=manager, **kwargs)


def adapter(ckpt_path: Path, **model_args: Any) -> Any:
    from gpt_lightning.evaluation.lm_eval_adapter import GPTLightningLM

    return GPTLightningLM(ckpt_path=str(ckpt_path), **model_args)


def request(kind: str, *args: Any) -> Any:
    from lm_eval.api.instance import Instance

    return Instance(kind, {}, args, 0)


# lm-eval's own hellaswag.yaml reads the same fields (after its own preprocessing of HellaSwag's text)
MULTIPLE_CHOICE = {"output_type": "multiple_choice", "doc_to_text": "ctx", "doc_to_choice": "endings",
                   "doc_to_target": "label"}  # fmt: skip


def hellaswag_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """HellaSwag's own fields, endings of 1 to 5 words: several BPE tokens each, and lengths that differ."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {
            "ctx": words(6).capitalize() + ".",
            "endings": [words(rng.randint(1, 5)) for _ in range(4)],
            "label": rng.randrange(4),
        }
        for _ in range(n)
    ]


@pytest.mark.slow
def test_our_evaluate_lm_eval_through_the_adapter_and_lm_evals_hf_model_on_the_export_agree(
    bpe_model: Path, tmp_path: Path
):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs lm_eval[hf] (the eval extra installs it)")
    rows = hellaswag_rows(40)
    metrics = [metric("acc"), metric("acc_norm"), metric("acc_bytes")]
    data = write_task(tmp_path, "tiny_hellaswag", rows, **MULTIPLE_CHOICE, metric_list=metrics)
    exported = tmp_path / "exported"
    assert_ok(cli("export", f"--ckpt_path={bpe_model}", f"--output={exported}", in_process=True))

    ours = {name: m["value"] for name, m in evaluate(str(bpe_model), [str(data)])["tasks"][0]["metrics"].items()}
    runs = {
        "adapter": run_lm_eval(tmp_path, "tiny_hellaswag", "gpt_lightning", {"ckpt_path": str(bpe_model)}),
        "adapter on the export": run_lm_eval(
            tmp_path, "tiny_hellaswag", "gpt_lightning", {"ckpt_path": str(exported)}, batch_size=3
        ),
        "hf on the export": run_lm_eval(
            tmp_path,
            "tiny_hellaswag",
            "hf",
            {"pretrained": str(exported), "dtype": "float32"},
            device="cpu",
            batch_size=4,
        ),
    }
    assert 0.1 < ours["acc"] < 0.9 and ours["acc"] != ours["acc_norm_bytes"], ours  # items that tell rules apart
    for path, run in runs.items():
        scores = run["results"]["tiny_hellaswag"]
        assert scores["acc,none"] == pytest.approx(ours["acc"]), path
        assert scores["acc_bytes,none"] == pytest.approx(ours["acc_norm_bytes"]), path  # per UTF-8 byte
        assert scores["acc_norm,none"] == pytest.approx(ours["acc_norm_bytes"]), path  # per character: ASCII
        assert scores["acc_stderr,none"] == pytest.approx(math.sqrt(ours["acc"] * (1 - ours["acc"]) / 39)), path

    # Item by item, every choice's log-likelihood is ours, whichever model lm-eval ran.
    model, tokenizer = load_model(bpe_model)
    expected = [[-loss for loss in s.losses] for s in score_choices(model, tokenizer, read_task(str(data)).items)]
    for path, run in runs.items():
        samples = sorted(run["samples"]["tiny_hellaswag"], key=lambda sample: sample["doc_id"])
        got = [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]
        assert got == [pytest.approx(lls, abs=1e-4) for lls in expected], path
    assert runs["adapter"]["config"]["gpt_lightning"]["global_step"] == 3  # the record names the checkpoint


def test_loglikelihood_rolling_is_our_text_scoring_and_lm_evals_bits_per_byte_counts_the_first_token(
    bpe_model: Path, tmp_path: Path
):
    texts = [make_play(12, seed=1), make_play(8, seed=2)]  # several windows of 64 tokens each
    model, tokenizer = load_model(bpe_model)
    windows = [score_text(model, tokenizer, text) for text in texts]
    assert all(len(w) > 2 for w in windows)

    lm = adapter(bpe_model, batch_size=3)
    nats = lm.loglikelihood_rolling([request("loglikelihood_rolling", text) for text in texts])
    assert nats == [pytest.approx(-sum(s.bits for s in w) * math.log(2), rel=1e-5) for w in windows]

    # lm-eval's bits_per_byte divides by every byte of a document; ours leaves out those of its first token,
    # which nothing predicts (our models have no beginning-of-text token).
    bits_per_byte = metric("bits_per_byte", aggregation="bits_per_byte", higher_is_better=False)
    rows = [{"text": text} for text in texts]
    task = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text"}
    write_task(tmp_path, "tiny_text", rows, **task, metric_list=[bits_per_byte])
    result = run_lm_eval(tmp_path, "tiny_text", "gpt_lightning", {"ckpt_path": str(bpe_model)})
    bits = sum(s.bits for w in windows for s in w)
    all_bytes = sum(len(text.encode()) for text in texts)
    assert result["results"]["tiny_text"]["bits_per_byte,none"] == pytest.approx(bits / all_bytes, rel=1e-5)
    ours = [next(m for m in text_metrics(w, tokenizer.vocab_size) if m.name == "bits_per_byte") for w in windows]
    first = [len(tokenizer.decode(tokenizer.encode(text)[:1]).encode()) for text in texts]
    for text, metric_, first_bytes, w in zip(texts, ours, first, windows, strict=True):
        assert metric_.value == pytest.approx(sum(s.bits for s in w) / (len(text.encode()) - first_bytes))


def test_generate_until_is_greedy_until_cut_before_the_first_stop_string(bpe_model: Path):
    model, tokenizer = load_model(bpe_model)
    prompt = "KING ARTHUR:\nGood lord, my king"
    uncut = greedy_until(model, tokenizer, tokenizer.encode(prompt), (), 24)
    # a stop string that first occurs a few characters in, so that the cut shows
    at = next(i for i in range(3, len(uncut) - 2) if uncut.index(uncut[i : i + 2]) == i)
    stop = uncut[at : at + 2]

    lm = adapter(bpe_model)
    requests = [
        request("generate_until", prompt, {"until": [stop], "max_gen_toks": 24}),
        request("generate_until", prompt, {"until": stop, "max_gen_toks": 24, "do_sample": False}),
        request("generate_until", prompt, {"until": [], "max_gen_toks": 5}),  # the token limit alone
    ]
    expected = [uncut[:at], uncut[:at], greedy_until(model, tokenizer, tokenizer.encode(prompt), (), 5)]
    assert lm.generate_until(requests) == expected
    assert expected[0] == greedy_until(model, tokenizer, tokenizer.encode(prompt), (stop,), 24)
    assert expected[2] != uncut

    sampling = request("generate_until", prompt, {"until": ["\n"], "do_sample": True, "temperature": 1.0})
    with pytest.raises(ValueError, match="decodes greedily only"):
        lm.generate_until([sampling])


def test_a_request_without_context_and_a_batch_size_of_auto_are_errors_that_say_why(bpe_model: Path):
    from gpt_lightning.evaluation.lm_eval_adapter import GPTLightningLM

    lm = GPTLightningLM.create_from_arg_string(f"ckpt_path={bpe_model},batch_size=2", {"batch_size": 1})
    assert lm.batch_size == 2  # the model argument wins over lm-eval's --batch_size
    assert lm.loglikelihood([request("loglikelihood", "Good lord ", "my king")])[0][0] < 0
    with pytest.raises(ValueError, match="no beginning-of-text token"):
        lm.loglikelihood([request("loglikelihood", "", "my king")])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        GPTLightningLM.create_from_arg_string(f"ckpt_path={bpe_model},batch_size=auto")


def test_the_adapter_imports_neither_lightning_nor_lm_evals_datasets():
    code = (
        "import sys; import gpt_lightning.evaluation.lm_eval_adapter; "
        "heavy = {'lightning', 'pytorch_lightning', 'torchmetrics', 'datasets', 'transformers'}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


def lm_eval_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m gpt_lightning.evaluation.lm_eval_adapter ARGS`: lm-eval's command line with our model."""
    command = [sys.executable, "-m", "gpt_lightning.evaluation.lm_eval_adapter", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=cli_env(**(env or {})))


@pytest.mark.slow
def test_lm_evals_command_line_runs_our_checkpoint_on_a_task_of_an_include_path(bpe_model: Path, tmp_path: Path):
    rows = hellaswag_rows(12, seed=1)
    data = write_task(tmp_path, "tiny_hellaswag", rows, **MULTIPLE_CHOICE, metric_list=[metric("acc")])
    result = lm_eval_command("--model", "gpt_lightning", "--model_args", f"ckpt_path={bpe_model},batch_size=2",
                             "--tasks", "tiny_hellaswag", "--include_path", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = [line for line in result.stdout.splitlines() if line.startswith("|tiny_hellaswag")]
    acc = evaluate(str(bpe_model), [str(data)])["tasks"][0]["metrics"]["acc"]["value"]
    assert row.split("|")[5].strip() == "acc" and float(row.split("|")[7]) == pytest.approx(acc, abs=5e-5), row


HELLASWAG_ON_THE_HUB = "Rowan/hellaswag"  # what lm-eval's own hellaswag task reads


@pytest.mark.slow
def test_lm_evals_own_hellaswag_runs_through_the_adapter_where_its_data_is_cached(bpe_model: Path):
    from huggingface_hub import constants

    cached = Path(constants.HF_HUB_CACHE) / f"datasets--{HELLASWAG_ON_THE_HUB.replace('/', '--')}"
    if not cached.is_dir():
        pytest.skip(f"lm-eval's hellaswag downloads {HELLASWAG_ON_THE_HUB} from the Hugging Face hub, which is not in "
                    f"this machine's cache ({constants.HF_HUB_CACHE}); the tests never use the network")  # fmt: skip
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = lm_eval_command("--model", "gpt_lightning", "--model_args", f"ckpt_path={bpe_model}", "--tasks",
                             "hellaswag", "--limit", "8", "--device", "cpu", env=offline)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(line.startswith("|hellaswag") and "|acc " in line for line in result.stdout.splitlines())
