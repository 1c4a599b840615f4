"""What a checkpoint is used for decides what is read from it: `model.init_from` starts a new run from its
weights (and checks the fine-tuning text against its training split: tests/e2e/test_transfer.py); `--ckpt_path`
resumes or validates it, with its own architecture, vocabulary and optimizer, and nothing else."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import signal
from pathlib import Path

import lightning
import pytest
import torch

from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sources import METADATA_KEY, metadata
from gpt_lightning.tokenizer import CharTokenizer
from tests.conftest import ROOT, TINY, assert_clean_error, assert_ok, cli, make_play

pytestmark = pytest.mark.slow


def pretraining_checkpoint(text: Path, path: Path, optimizer: str = "adamw") -> Path:
    """A checkpoint as pre-training on all of `text` writes it (random weights, and no optimizer state in its
    training state, will do)."""
    tokenizer = CharTokenizer.from_text(text.read_text(encoding="utf-8"))
    config = GPTConfig(vocab_size=len(tokenizer.vocab), block_size=32, n_layer=2, n_head=2, n_embd=32)
    data = {"source": str(text), "source_sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
            "selection": {"span": None, "speakers": None}, "val_fraction": 0.1}  # fmt: skip
    state = {f"gpt.{k}": v for k, v in GPT(config).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"optimizer": optimizer}, "global_step": 0,
                "optimizer_states": [],
                "pytorch-lightning_version": lightning.__version__,
                METADATA_KEY: metadata(config, tokenizer, data)}, path)  # fmt: skip
    return path


def recipe_run(subcommand: str, text: Path, checkpoint: Path, tmp_path: Path, *args: str):
    """The CPU recipe as a user runs it (its own 4-layer architecture), on a 2-layer checkpoint."""
    tiny_run = [a for a in TINY if not a.startswith(("--model.", "--data."))]
    logger = [f"--trainer.logger.init_args.save_dir={tmp_path}"] if subcommand == "fit" else []
    return cli(subcommand, "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--ckpt_path={checkpoint}",
               f"--data.path={text}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.val_batch_size=64",
               *tiny_run, *logger, *args, in_process=True)  # fmt: skip


def test_validate_takes_the_checkpoints_architecture_warns_of_nothing_and_builds_no_other_cache(text_file, tmp_path):
    from gpt_lightning.data.token_cache import build_token_cache

    checkpoint = pretraining_checkpoint(text_file, tmp_path / "pre.ckpt")
    build_token_cache(text_file, tmp_path / "cache")  # what the pre-training run left in its cache folder
    result = recipe_run("validate", text_file, checkpoint, tmp_path)
    assert_ok(result)
    assert "val/loss" in result.stdout
    assert "fine-tuning" not in result.stderr
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1


def test_resuming_takes_the_checkpoints_architecture(pretrained: Path, text_file: Path, tmp_path: Path):
    checkpoint = pretrained / "checkpoints" / "last.ckpt"
    result = recipe_run("fit", text_file, checkpoint, tmp_path, "--trainer.max_steps=41")
    assert_ok(result)
    assert "fine-tuning" not in result.stderr
    assert torch.load(next(tmp_path.glob("**/last.ckpt")), weights_only=True)["global_step"] == 41


@pytest.mark.parametrize(("saved", "asked"), [("muon", "adamw"), ("adamw", "muon")])
def test_resuming_with_another_optimizer_names_the_flag(text_file: Path, tmp_path: Path, saved: str, asked: str):
    checkpoint = pretraining_checkpoint(text_file, tmp_path / "pre.ckpt", optimizer=saved)
    result = recipe_run("fit", text_file, checkpoint, tmp_path, f"--model.optimizer={asked}")
    assert_clean_error(result, f"model.optimizer={saved}", f"--model.optimizer {saved}")


# -- every checkpoint the project writes, through every use ------------------------------------------------

# A model small enough that a run costs its start-up: one block, 16 wide, 2 steps.
SMALL = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--data.block_size=16"]
QUICK = ["--model.warmup_steps=1", "--data.batch_size=4", "--data.val_batch_size=16", "--trainer.max_steps=2",
         "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
         "--progress_bar.refresh_rate=0", "--trainer.enable_model_summary=false",
         "--sample.max_new_tokens=4"]  # fmt: skip
CPU_FINETUNE = ["--config", str(ROOT / "configs/finetune.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml")]
TASK_FINETUNE = [
    "--config",
    str(ROOT / "configs/finetune_task.yaml"),
    "--config",
    str(ROOT / "configs/trainer/cpu.yaml"),
]
GPT2_FINETUNE = ["--config", str(ROOT / "configs/finetune_gpt2.yaml"), "--trainer.accelerator=cpu",
                 "--trainer.precision=32-true"]  # fmt: skip


@dataclasses.dataclass
class Written:
    """A checkpoint, the recipe that wrote it (its start, for a fine-tune, deleted since, as a user moves a base
    checkpoint away) and the recipe's config files alone (the start they name does not exist here)."""

    path: Path
    recipe: list[str]
    configs: list[str]
    data: list[str] | None = None  # its data arguments, where they are not the text's


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Written], list[str]]:
    """Every kind of checkpoint the project writes, and the data arguments of the text they trained on."""
    transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers for these tests")
    from tests.unit.test_hf import train_bpe

    root = tmp_path_factory.mktemp("kinds")
    text = root / "play.txt"
    text.write_text(make_play(150), encoding="utf-8")
    bpe = train_bpe(root / "bpe.json", vocab_size=300)
    data = [f"--data.path={text}", f"--data.cache_dir={root / 'cache'}", "--data.speakers=null",
            "--data.text_span=null"]  # fmt: skip
    # A GPT-2 folder whose embedding has more rows than its tokenizer has tokens (padded, as nanoGPT pads
    # GPT-2's 50,257 to 50,304), and whose head is its own.
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "tokenizer.json").write_bytes(bpe.read_bytes())
    torch.manual_seed(0)
    hf = transformers.GPT2Config(vocab_size=320, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                 tie_word_embeddings=False)  # fmt: skip
    transformers.GPT2LMHeadModel(hf).save_pretrained(gpt2)
    base = root / "base" / "last.ckpt"

    kinds: dict[str, Written] = {}

    def fit(kind: str, configs: list[str], *args: str, own_data: list[str] | None = None) -> None:
        runs = root / kind
        recipe = [*configs, *(data if own_data is None else own_data), *args]
        assert_ok(cli("fit", *recipe, *QUICK, f"--trainer.logger.init_args.save_dir={runs}", in_process=True))
        [last] = runs.glob("*/version_0/checkpoints/last.ckpt")
        kinds[kind] = Written(last, recipe, configs, own_data)

    pretrain = ["--config", str(ROOT / "configs/pretrain_cpu.yaml")]
    fit("character", pretrain, *SMALL)
    fit("BPE", pretrain, *SMALL, f"--data.tokenizer={bpe}")
    fit("padded BPE", pretrain, *SMALL, f"--data.tokenizer={bpe}", "--model.vocab_size=320")
    base.parent.mkdir()
    base.write_bytes(kinds["character"].path.read_bytes())
    fit("LoRA", CPU_FINETUNE, "--model.lora.rank=2", f"--model.init_from={base}")
    fit("from a GPT-2 folder", GPT2_FINETUNE, "--data.block_size=16", f"--model.init_from={gpt2}")
    # A task fine-tune of the BPE model (a character vocabulary of this text lacks the template's Q and $).
    bpe_base = root / "bpe_base.ckpt"
    bpe_base.write_bytes(kinds["BPE"].path.read_bytes())
    fit("task fine-tune", TASK_FINETUNE, f"--model.init_from={bpe_base}", "--task_scores.limit=4",
        own_data=[f"--data.task=reverse-words:{text}", "--data.task_examples=200",
                  f"--task_scores.tasks=[reverse-words:{text}]"])  # fmt: skip
    fit("task LoRA fine-tune", TASK_FINETUNE, f"--model.init_from={bpe_base}", "--task_scores.limit=4",
        "--model.lora.rank=2", own_data=[f"--data.task=reverse-words:{text}", "--data.task_examples=200"])  # fmt: skip
    fit("task fine-tune of a GPT-2 folder", TASK_FINETUNE, f"--model.init_from={gpt2}", "--task_scores.limit=4",
        own_data=[f"--data.task=reverse-words:{text}", "--data.task_examples=200"])  # fmt: skip
    merged = root / "merged.ckpt"
    assert_ok(cli("export", f"--ckpt_path={kinds['LoRA'].path}", f"--output={merged}", in_process=True))
    kinds["merged export"] = Written(merged, kinds["LoRA"].recipe, CPU_FINETUNE)
    base.unlink()
    bpe_base.unlink()
    shutil.rmtree(gpt2)
    return kinds, data


@pytest.mark.parametrize(
    "kind",
    ["character", "BPE", "padded BPE", "LoRA", "merged export", "from a GPT-2 folder", "task fine-tune",
     "task LoRA fine-tune", "task fine-tune of a GPT-2 folder"],
)  # fmt: skip
def test_every_checkpoint_resumes_validates_samples_serves_exports_and_starts_a_fine_tune(
    written, kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from gpt_lightning.serving.server import GPTStreamAPI, describe_model
    from gpt_lightning.sources import load_model, open_source

    caplog.set_level(logging.INFO)
    from gpt_lightning.data.instruct import render_prompt

    kinds, text_data = written
    ckpt, recipe = kinds[kind].path, kinds[kind].recipe
    data = kinds[kind].data or text_data
    facts = open_source(ckpt)
    # Resumed with the recipe as it was run: the run's own checkpoint is the only source, the start is not read.
    resumed = cli("fit", *recipe, *QUICK, f"--ckpt_path={ckpt}", f"--trainer.max_steps={facts.global_step + 1}",
                  f"--trainer.logger.init_args.save_dir={tmp_path / 'resumed'}", in_process=True)  # fmt: skip
    if kind == "merged export":  # weights and a description, no training state: the error says what to do
        assert_clean_error(resumed, "holds no training state", f"--model.init_from {ckpt}")
    else:
        assert_ok(resumed)
        [last] = (tmp_path / "resumed").glob("*/version_*/checkpoints/last.ckpt")
        assert open_source(last).global_step == facts.global_step + 1
    # Validated with the recipe's config files, whose start (runs/pretrain_cpu/..., gpt2) is not here.
    validated = cli("validate", *kinds[kind].configs, *data, f"--ckpt_path={ckpt}", "--trainer.logger=false",
                    "--trainer.limit_val_batches=2", "--progress_bar.refresh_rate=0", in_process=True)  # fmt: skip
    assert_ok(validated)
    assert "val/loss" in validated.stdout
    fine_tune = any(arg.startswith("--model.init_from") for arg in recipe)
    assert ("model.init_from" in caplog.text and "is ignored" in caplog.text) == fine_tune

    sampled = cli("generate", f"--ckpt_path={ckpt}", "--prompt=KING", "--max_new_tokens=6", "--seed=2", in_process=True)
    assert_ok(sampled)
    described = describe_model(str(ckpt))
    assert described["vocab_size"] == facts.tokenizer.vocab_size == facts.config.vocab_size
    # Padded by --model.vocab_size 320, by the GPT-2 recipe's 50304, or as the GPT-2 folder, to 320 rows.
    padded = kind in ("padded BPE", "from a GPT-2 folder", "task fine-tune of a GPT-2 folder")
    assert (described["padding_parameters"] > 0) == padded == (facts.config.padded_vocab_size is not None)
    api = GPTStreamAPI(str(ckpt), str(tmp_path))
    sigint = signal.getsignal(signal.SIGINT)
    try:
        api.setup("cpu")  # a worker process's set-up: it ignores SIGINT
    finally:
        signal.signal(signal.SIGINT, sigint)  # which this test process, and every fit it starts later, must not
    request = {"prompt": "KING", "max_new_tokens": 6, "temperature": 0.8, "top_k": None, "top_p": None, "seed": 2,
               "stream_id": "s"}  # fmt: skip
    served = list(api.predict(request))
    # A fine-tune on task data reads the prompt in its template, in both.
    assert served[-1]["done"]
    assert render_prompt(facts.template, "KING") + "".join(m["text"] for m in served) + "\n" == sampled.stdout

    ours, tokenizer = load_model(ckpt)
    ids = tokenizer.encode("KING ARTHUR:")[None]
    for output in (tmp_path / "hf", tmp_path / "plain.ckpt"):
        assert_ok(cli("export", f"--ckpt_path={ckpt}", f"--output={output}", in_process=True))
        exported, _ = load_model(output)
        with torch.no_grad():
            assert torch.allclose(exported(ids), ours(ids), atol=1e-5, rtol=0)

    started = cli("fit", *CPU_FINETUNE, *text_data, *QUICK, f"--model.init_from={ckpt}", "--trainer.max_steps=1",
                  f"--trainer.logger.init_args.save_dir={tmp_path / 'fine-tune'}", in_process=True)  # fmt: skip
    assert_ok(started)
    [start] = (tmp_path / "fine-tune").glob("*/version_0/checkpoints/last.ckpt")
    # Architecture, vocabulary size and context: all of it (dropout is the fine-tune's own).
    assert open_source(start).config == dataclasses.replace(facts.config, dropout=0.0)


def test_the_model_takes_every_setting_a_checkpoint_decides():
    """--ckpt_path copies each into the model's options: a GPTConfig field the model does not take would be
    the recipe's, not the checkpoint's, on resume."""
    import inspect

    from gpt_lightning.sources import DECIDED_BY_CHECKPOINT
    from gpt_lightning.training.module import GPTModule

    taken = set(inspect.signature(GPTModule).parameters)
    assert set(DECIDED_BY_CHECKPOINT) - {"block_size"} <= taken  # block_size is the data module's, linked
