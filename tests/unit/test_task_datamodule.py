"""The task data module: its vocabulary (or the refusal of a checkpoint's), splits, block size and batches; and a
task fine-tune end to end: fit configs/finetune_task.yaml, generate in the template, evaluate, LoRA, resume."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from gpt_lightning.data.instruct import IGNORE_INDEX, TEMPLATES, ExampleBatches, TaskDataError
from gpt_lightning.evaluation import evaluate
from gpt_lightning.lora import LoRAConfig
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sources import load_model, metadata
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from gpt_lightning.training.module import GPTModule
from gpt_lightning.training.task_datamodule import TaskDataModule
from tests.conftest import ROOT, assert_clean_error, assert_ok, cli, make_play, scalars
from tests.e2e.test_resume import assert_same_run
from tests.unit.test_hf import train_bpe

SHAKESPEARE = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's 65


def char_checkpoint(path: Path, vocab: str, block_size: int = 32, tokenizer: Tokenizer | None = None, **config) -> Path:
    """A checkpoint of ours with random weights and a character vocabulary (or `tokenizer`): enough to start a
    fine-tune from. `config`: GPTConfig fields (vocab_size, tie_embeddings) instead of the tiny defaults."""
    tokenizer = tokenizer or CharTokenizer(vocab)
    shape = {"vocab_size": tokenizer.vocab_size, "n_layer": 1, "n_head": 1, "n_embd": 8, **config}
    gpt_config = GPTConfig(block_size=block_size, **shape)
    state = {f"gpt.{k}": v for k, v in GPT(gpt_config).state_dict().items()}
    torch.save({"state_dict": state, "gpt_lightning": metadata(gpt_config, tokenizer)}, path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_pre_trained_character_vocabulary_without_digits_refuses_addition_with_the_missing_list(tmp_path: Path):
    ckpt = char_checkpoint(tmp_path / "shakespeare.ckpt", SHAKESPEARE)
    data = TaskDataModule(task="addition-2", task_examples=100, init_from=str(ckpt))
    with pytest.raises(ValueError) as error:
        data.vocab  # noqa: B018 (the CLI asks for it first)
    message = str(error.value)
    assert message.startswith("10 character(s) of the task data or the template plain are not in the 65-character")
    for char in "012456789+":
        assert repr(char) in message
    assert "'3'" not in message  # tiny Shakespeare has a 3
    assert "(addition-2 train item 0)" in message and "drop model.init_from" in message
    assert "or set data.grow_vocab true to add them" in message  # the opt-in, named as a fix
    # the same vocabulary reads a task in its characters, and the chat template's markers are refused too
    words = tmp_path / "words.txt"
    words.write_text(make_play(50))
    assert TaskDataModule(task=f"reverse-words:{words}", init_from=str(ckpt)).tokenizer.vocab == SHAKESPEARE
    with pytest.raises(ValueError, match=r"the template chat .* '<' \(template chat\)"):
        TaskDataModule(task=f"reverse-words:{words}", template="chat", init_from=str(ckpt)).tokenizer  # noqa: B018


DIGITS_AND_PLUS = "+012456789"  # what addition-2 needs beyond tiny Shakespeare's 65, sorted


def test_grow_vocab_appends_the_missing_characters_sorted_so_every_old_id_keeps_its_character(tmp_path: Path):
    ckpt = char_checkpoint(tmp_path / "shakespeare.ckpt", SHAKESPEARE)
    data = TaskDataModule(task="addition-2", task_examples=100, init_from=str(ckpt), grow_vocab=True)
    assert data.vocab == SHAKESPEARE + DIGITS_AND_PLUS
    # nothing missing, nothing added: a resumed grown run reads its own checkpoint's vocabulary as it is
    words = tmp_path / "words.txt"
    words.write_text(make_play(50))
    assert TaskDataModule(task=f"reverse-words:{words}", init_from=str(ckpt), grow_vocab=True).vocab == SHAKESPEARE


def test_grow_vocab_on_a_bpe_model_is_an_error_saying_its_bytes_read_any_text(tmp_path: Path):
    bpe = BPETokenizer.from_file(train_bpe(tmp_path / "tokenizer.json"))
    ckpt = char_checkpoint(tmp_path / "bpe.ckpt", "", tokenizer=bpe)
    with pytest.raises(ValueError, match=r"data.grow_vocab .* BPE, which encodes any text .* drop data.grow_vocab"):
        TaskDataModule(task="addition-2", init_from=str(ckpt), grow_vocab=True)
    with pytest.raises(ValueError, match=r"data.grow_vocab .* BPE"):
        TaskDataModule(task="addition-2", tokenizer=str(tmp_path / "tokenizer.json"), grow_vocab=True)


@pytest.mark.parametrize("shape", [{}, {"tie_embeddings": False}, {"vocab_size": 128}])
def test_a_grown_vocabulary_keeps_the_checkpoints_rows_and_starts_the_new_ones_at_their_mean(tmp_path: Path, shape):
    ckpt = char_checkpoint(tmp_path / "shakespeare.ckpt", SHAKESPEARE, **shape)
    base, _ = load_model(ckpt)
    grown = GPTModule(vocab=SHAKESPEARE + DIGITS_AND_PLUS, block_size=32, init_from=str(ckpt)).gpt.eval()
    old, new = len(SHAKESPEARE), len(SHAKESPEARE) + len(DIGITS_AND_PLUS)
    assert grown.config.vocab_size == new
    assert grown.config.vocab_rows == max(new, shape.get("vocab_size", 0))  # a padded table has room already
    for name in ("wte", "lm_head"):
        before, after = getattr(base, name).weight, getattr(grown, name).weight
        assert after.shape == (grown.config.vocab_rows, 8)
        assert torch.equal(after[:old], before[:old])  # every old id keeps its row
        assert torch.equal(after[old:new], before[:old].mean(0).expand(new - old, -1))  # an average token
        assert torch.equal(after[new:], before[new:])  # padding beyond the tokenizer's ids is left as it was
    assert (grown.lm_head.weight is grown.wte.weight) == shape.get("tie_embeddings", True)
    ids = CharTokenizer(SHAKESPEARE).encode("KING:\nGood lord")[None]
    with torch.no_grad():  # old text's old-token logits are the checkpoint's
        assert torch.allclose(grown(ids)[..., :old], base(ids)[..., :old], atol=1e-6, rtol=0)


def test_a_tokenizer_that_does_not_extend_the_checkpoints_and_growing_under_lora_are_errors(tmp_path: Path):
    ckpt = char_checkpoint(tmp_path / "shakespeare.ckpt", SHAKESPEARE)
    with pytest.raises(ValueError, match=r"not the tokenizer of .*shakespeare.ckpt.* nor its vocabulary with"):
        GPTModule(vocab=SHAKESPEARE[::-1], block_size=32, init_from=str(ckpt))
    with pytest.raises(ValueError, match=r"LoRA freezes the token embedding .*\(model.lora.rank 0\)"):
        GPTModule(vocab=SHAKESPEARE + "0", block_size=32, init_from=str(ckpt), lora=LoRAConfig(rank=2))


def test_a_grown_fine_tune_on_addition_trains_writes_its_digits_and_records_its_vocabulary(tmp_path: Path):
    ckpt = char_checkpoint(tmp_path / "shakespeare.ckpt", SHAKESPEARE)
    result = finetune(ckpt, tmp_path, tmp_path, "--data.task=addition-2", "--data.grow_vocab=true",
                      "--task_scores.tasks=[addition-2]", "--trainer.max_steps=3", in_process=True)  # fmt: skip
    assert_ok(result)
    run = tmp_path / "finetune_task" / "version_0"
    assert "val/addition-2/exact_match" in scalars(run)
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["gpt_lightning"]
    assert saved["tokenizer"] == {"type": "char", "vocab": SHAKESPEARE + DIGITS_AND_PLUS}
    assert saved["model_config"]["vocab_size"] == len(SHAKESPEARE + DIGITS_AND_PLUS)
    answered = cli("generate", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--prompt=12+34",
                   "--max_new_tokens=4", "--seed=1", in_process=True)  # fmt: skip
    assert_ok(answered)
    assert answered.stdout.startswith("Q: 12+34\nA: ")
    lora = finetune(ckpt, tmp_path, tmp_path / "lora", "--data.task=addition-2", "--data.grow_vocab=true",
                    "--model.lora.rank=2", "--trainer.max_steps=1", in_process=True)  # fmt: skip
    assert_clean_error(lora, r"LoRA freezes the token embedding")


def test_a_grown_fine_tune_resumes_bit_exactly(tmp_path: Path):
    ckpt = char_checkpoint(tmp_path / "shakespeare.ckpt", SHAKESPEARE)
    grow = ["--data.task=addition-2", "--data.grow_vocab=true", "--task_scores.tasks=[]", "--model.dropout=0.1"]
    assert_ok(finetune(ckpt, tmp_path, tmp_path / "a", *grow, "--trainer.max_steps=6", "--model.lr_decay_steps=6",
                       in_process=True))  # fmt: skip
    assert_ok(finetune(ckpt, tmp_path, tmp_path / "b", *grow, "--trainer.max_steps=3", "--model.lr_decay_steps=6",
                       in_process=True))  # fmt: skip
    # a resume reads its checkpoint's grown vocabulary and shape: nothing is missing, nothing grows again
    assert_ok(finetune(ckpt, tmp_path, tmp_path / "b", *grow, "--trainer.max_steps=6", "--model.lr_decay_steps=6",
                       "--ckpt_path=last", "--model.init_from=null", in_process=True))  # fmt: skip
    assert_same_run(tmp_path / "a" / "finetune_task" / "version_0", tmp_path / "b" / "finetune_task" / "version_0", 6)


def test_from_scratch_the_vocabulary_is_the_datas_and_the_templates_and_the_block_size_the_longest(tmp_path: Path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "completion": "x" * i} for i in range(1, 21)])
    data = TaskDataModule(train_file=str(train), template="chat", val_fraction=0.25, seed=3)
    assert set(data.vocab) == set("p0123456789x") | set(TEMPLATES["chat"].markers)
    assert len(data.splits["val"]) == 5 and len(data.splits["train"]) == 15
    again = TaskDataModule(train_file=str(train), template="chat", val_fraction=0.25, seed=3)
    assert [e.where for e in again.splits["val"]] == [e.where for e in data.splits["val"]]  # a fixed seed
    longest = max(x.numel() for pairs in data.encoded.values() for x, _ in pairs)
    assert data.block_size == longest
    with pytest.raises(TaskDataError, match=r"20 example\(s\) are longer than the block size of 8 tokens"):
        TaskDataModule(train_file=str(train), block_size=8).encoded  # noqa: B018
    val = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "p1", "completion": "x"}])
    assert len(TaskDataModule(train_file=str(train), val_file=str(val)).splits["val"]) == 1
    with pytest.raises(ValueError, match="one of them"):
        TaskDataModule()
    with pytest.raises(ValueError, match="one of them"):
        TaskDataModule(train_file=str(train), task="addition-2")


def test_training_batches_depend_only_on_seed_rank_and_index_and_cover_every_example_each_epoch():
    pairs = [(torch.tensor([i, i]), torch.tensor([IGNORE_INDEX, i])) for i in range(10)]
    first = [ExampleBatches(pairs, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    epoch = [int(x) for i in range(3) for batches in first for x in batches.batch(i).inputs[:, 0]][:10]
    assert sorted(epoch) == list(range(10))  # the two ranks share each epoch's order: each example once
    resumed = ExampleBatches(pairs, 2, seed=1, rank=1, world_size=2, start=4)
    assert torch.equal(next(iter(resumed)).inputs, first[1].batch(4).inputs)
    assert not torch.equal(
        ExampleBatches(pairs, 2, seed=2).batch(0).inputs, ExampleBatches(pairs, 2, 1).batch(0).inputs
    )


def test_packed_batches_hold_the_padded_batches_examples_in_fewer_rows_and_setup_reports_the_padding(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    rows = [{"prompt": f"p{i}", "completion": "x" * (1 + i % 23)} for i in range(300)]  # 8 to 30 tokens
    settings = {"train_file": str(write_jsonl(tmp_path / "t.jsonl", rows)), "batch_size": 16, "block_size": 64}
    padded, packed = TaskDataModule(**settings), TaskDataModule(**settings, pack=True)
    padded_batches, packed_batches = padded.train_dataloader(), packed.train_dataloader()
    assert isinstance(padded_batches, ExampleBatches) and isinstance(packed_batches, ExampleBatches)
    for i in range(3):
        a, b = padded_batches.batch(i), packed_batches.batch(i)
        assert a.segments is None and b.segments is not None
        # the same examples, in the same order: example k of the batch is segment k of the pack
        for k in range(16):
            assert torch.equal(b.inputs[b.segments == k], a.inputs[k, : a.lengths[k]])
            assert torch.equal(b.targets[b.segments == k], a.targets[k, : a.lengths[k]])
        assert b.inputs.shape[0] < a.inputs.shape[0] and b.inputs.shape[1] <= 64 and b.padding < a.padding
    [val] = list(packed.val_dataloader())  # 30 validation examples, one batch of at most 64
    assert val.segments is not None and sorted(set(val.segments.flatten().tolist()) - {-1}) == list(range(30))
    said: list[str] = []
    monkeypatch.setattr("gpt_lightning.training.task_datamodule.rank_zero_info", said.append)
    padded.setup("fit")
    packed.setup("fit")
    shares = [float(share) for share in re.findall(r"([\d.]+)% of their positions are padding", "\n".join(said))]
    assert "padded to their longest" in said[0] and "packed into rows of 64 tokens" in said[1]
    epoch = math.ceil(270 / 16)
    assert shares == [pytest.approx(100 * b.padding(epoch), abs=0.05) for b in (padded_batches, packed_batches)]
    assert shares[1] < shares[0]


# -- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny pre-training on play-shaped text that holds the plain template's characters (Q, A, :, $), and
    that text: (its last.ckpt, the text file)."""
    folder = tmp_path_factory.mktemp("plain")
    text = folder / "play.txt"
    text.write_text(make_play(300) + "\nQUEEN:\nAh, $!\n")
    result = cli(
        "fit", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), f"--data.path={text}",
        f"--data.cache_dir={folder}/token_cache", f"--trainer.logger.init_args.save_dir={folder}",
        "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--data.block_size=24", "--data.batch_size=4",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--progress_bar.refresh_rate=0", "--trainer.enable_model_summary=false", "--sample.every_n_validations=0",
        in_process=True,
    )  # fmt: skip
    assert_ok(result)
    return folder / "pretrain_cpu" / "version_0" / "checkpoints" / "last.ckpt", text


def finetune(start: Path, text: Path, runs: Path, *args: str, in_process: bool = False):
    """The shipped configs/finetune_task.yaml with the CPU trainer, shrunk: 64 problems, batches of 4."""
    return cli(
        "fit", "--config", str(ROOT / "configs/finetune_task.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml"),
        f"--model.init_from={start}", f"--data.task=reverse-words:{text}", "--data.task_examples=64",
        "--data.batch_size=4", f"--trainer.logger.init_args.save_dir={runs}", "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=3", "--last_checkpoint.every_n_train_steps=3", "--progress_bar.refresh_rate=0",
        "--trainer.enable_model_summary=false", "--sample.max_new_tokens=4", "--task_scores.limit=4",
        "--task_scores.max_new_tokens=6", *args, in_process=in_process,
    )  # fmt: skip


@pytest.mark.slow  # a fit and a generate in subprocesses
def test_finetune_task_config_trains_on_answers_and_generate_answers_in_the_template(
    plain_pretrained: tuple[Path, Path], tmp_path: Path
):
    start, text = plain_pretrained
    assert_ok(finetune(start, text, tmp_path, "--trainer.max_steps=3"))  # a subprocess, as a user runs it
    run = tmp_path / "finetune_task" / "version_0"
    logged = scalars(run)
    assert [step for step, _ in logged["train/padding"]] == [0, 1, 2]
    assert all(0 <= value < 1 for _, value in logged["train/padding"]) and "val/loss" in logged
    [(step, accuracy)] = logged["val/reverse-words/exact_match"]  # greedy answers to 4 held-out test words
    assert [step] == [s for s, _ in logged["val/loss"]] and 0 <= accuracy <= 1
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["gpt_lightning"]
    assert saved["template"] == TEMPLATES["plain"].to_dict()
    assert saved["data"]["task"] == f"reverse-words:{text}"
    assert 0 < saved["data"]["examples"]["train"] <= 64  # at most task_examples: the text has few words
    assert saved["tokenizer"] == torch.load(start, weights_only=True)["gpt_lightning"]["tokenizer"]

    answered = cli("generate", f"--ckpt_path={ckpt}", "--prompt=hello", "--temperature=0", "--max_new_tokens=6")
    assert_ok(answered)
    assert answered.stdout.startswith("Q: hello\nA: ")  # the template applied
    assert "$" not in answered.stdout  # generation stops at the end marker, never shows it
    raw = cli("generate", f"--ckpt_path={ckpt}", "--prompt=hello", "--raw=true", "--max_new_tokens=3", in_process=True)
    assert_ok(raw)
    assert raw.stdout.startswith("hello") and not raw.stdout.startswith("Q: ")
    base = cli("generate", f"--ckpt_path={start}", "--prompt=hello", "--max_new_tokens=3", in_process=True)
    assert_ok(base)  # a base model has no template: its prompt is continued as it is
    assert base.stdout.startswith("hello") and len(base.stdout) == len("hello") + 3 + 1

    result = evaluate(str(ckpt), [f"reverse-words:{text}"], limit=2, max_new_tokens=6)
    [task] = result["tasks"]
    assert task["name"] == "reverse-words" and task["metrics"]["exact_match"]["n"] == 2


def test_a_task_fine_tune_scores_its_own_task_on_your_text_with_no_corpus_at_hand(
    plain_pretrained: tuple[Path, Path], tmp_path: Path
):
    # data.task reverse-words:PATH, and nothing said of task_scores: the held-out words scored are PATH's, and
    # the corpus (data/, absent here and offline) is never asked for.
    start, text = plain_pretrained
    result = finetune(start, text, tmp_path, "--trainer.max_steps=3", f"--data.data_dir={tmp_path / 'no_corpus'}",
                      in_process=True)  # fmt: skip
    assert_ok(result)
    logged = scalars(tmp_path / "finetune_task" / "version_0")
    assert [step for step, _ in logged["val/reverse-words/exact_match"]] == [2]
    assert not (tmp_path / "no_corpus").exists()
    # a task named in task_scores.tasks as well is scored once
    again = finetune(start, text, tmp_path, "--trainer.max_steps=3", f"--task_scores.tasks=[reverse-words:{text}]",
                     in_process=True)  # fmt: skip
    assert_ok(again)
    assert len(scalars(tmp_path / "finetune_task" / "version_1")["val/reverse-words/exact_match"]) == 1


def test_a_packed_lora_fine_tune_trains_on_the_packed_batches_and_resumes_on_them(tmp_path: Path):
    start = char_checkpoint(tmp_path / "start.ckpt", SHAKESPEARE, block_size=64)
    text = tmp_path / "play.txt"
    text.write_text(make_play(50))
    args = ["--data.pack=true", "--model.lora.rank=2", "--task_scores.data_task=false"]
    assert_ok(finetune(start, text, tmp_path, *args, "--trainer.max_steps=3", in_process=True))
    assert_ok(finetune(start, text, tmp_path, *args, "--trainer.max_steps=5", "--ckpt_path=last", in_process=True))
    logged = scalars(tmp_path / "finetune_task" / "version_0")["train/padding"]
    data = TaskDataModule(task=f"reverse-words:{text}", task_examples=64, batch_size=4, pack=True, init_from=str(start))
    batches = data.train_dataloader()
    assert isinstance(batches, ExampleBatches)
    # each step's padding is its packed batch's, the resumed steps' too
    assert logged == [(i, pytest.approx(batches.batch(i).padding, abs=1e-6)) for i in range(5)]


@pytest.mark.slow  # two processes
def test_a_packed_fine_tune_under_ddp_on_cpu_ends_with_one_set_of_weights(tmp_path: Path):
    start = char_checkpoint(tmp_path / "start.ckpt", SHAKESPEARE, block_size=64)
    text = tmp_path / "play.txt"
    text.write_text(make_play(50))
    probe = tmp_path / "probe"
    ddp = ["--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), "--trainer.callbacks+=tests.probe.RecordRank",
           f"--trainer.callbacks.out_dir={probe}"]  # fmt: skip
    result = finetune(start, text, tmp_path, "--data.pack=true", "--task_scores.data_task=false",
                      "--trainer.max_steps=3", *ddp)  # fmt: skip
    assert_ok(result)
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["losses"] != ranks[1]["losses"]  # their own data


def test_a_fine_tune_that_the_vocabulary_cannot_read_stops_with_the_missing_list(tmp_path: Path):
    ckpt = char_checkpoint(tmp_path / "shakespeare.ckpt", SHAKESPEARE)
    result = finetune(ckpt, tmp_path, tmp_path, "--data.task=addition-2", "--task_scores.tasks=[]",
                      "--trainer.max_steps=1", in_process=True)  # fmt: skip
    assert_clean_error(result, r"10 character\(s\) of the task data .* '0' \(addition-2 train item \d+\)")


def test_generate_stops_at_the_templates_end_marker_and_a_base_models_generate_runs_to_the_limit(tmp_path: Path):
    # A model that always predicts the end marker: ln_f outputs its bias (ones), and only $'s head row reads it.
    config = GPTConfig(vocab_size=len(SHAKESPEARE), block_size=32, n_layer=1, n_head=1, n_embd=8, bias=True,
                       tie_embeddings=False)  # fmt: skip
    gpt = GPT(config)
    with torch.no_grad():
        gpt.ln_f.weight.zero_()
        gpt.ln_f.bias.fill_(1.0)
        gpt.lm_head.weight.zero_()
        gpt.lm_head.weight[SHAKESPEARE.index("$")] = 10.0
    state = {f"gpt.{k}": v for k, v in gpt.state_dict().items()}
    tokenizer = CharTokenizer(SHAKESPEARE)
    for name, template in (("tuned", TEMPLATES["plain"]), ("base", None)):
        described = metadata(config, tokenizer, template=template)
        torch.save({"state_dict": state, "gpt_lightning": described}, tmp_path / f"{name}.ckpt")
    tuned = cli("generate", f"--ckpt_path={tmp_path / 'tuned.ckpt'}", "--prompt=hello", "--temperature=0",
                "--max_new_tokens=5", in_process=True)  # fmt: skip
    assert_ok(tuned)
    assert tuned.stdout == "Q: hello\nA: \n"  # the template applied; the first token was the end marker
    base = cli("generate", f"--ckpt_path={tmp_path / 'base.ckpt'}", "--prompt=hello", "--temperature=0",
               "--max_new_tokens=5", in_process=True)  # fmt: skip
    assert_ok(base)
    assert base.stdout == "hello$$$$$\n"  # no template: the prompt as it is, and no stop


@pytest.mark.slow  # three fits, and the DDP one in subprocesses
def test_a_task_lora_fine_tune_resumes_bit_exactly_after_sigterm_and_trains_under_ddp(
    plain_pretrained: tuple[Path, Path], tmp_path: Path
):
    from tests.e2e.test_resume import assert_same_run

    start, text = plain_pretrained
    lora = ["--model.lora.rank=2", "--model.lora.dropout=0.1", "--model.learning_rate=1e-2"]  # LoRA's own dropout

    def fit(runs: Path, *more: str):
        return finetune(start, text, runs, *lora, "--trainer.max_steps=8", "--task_scores.data_task=false", *more,
                        in_process=True)  # fmt: skip

    assert_ok(fit(tmp_path / "a"))
    stopped = fit(tmp_path / "b", "--trainer.callbacks+=tests.probe.StopAfterBatch", "--trainer.callbacks.batch=4")
    assert stopped.returncode != 0 and "last.ckpt" in stopped.stderr, stopped.stderr[-2000:]
    assert_ok(fit(tmp_path / "b", "--ckpt_path=last", "--model.init_from=null"))
    assert_same_run(tmp_path / "a" / "finetune_task" / "version_0", tmp_path / "b" / "finetune_task" / "version_0", 8)

    ddp = finetune(start, text, tmp_path / "ddp", *lora, "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"),
                   "--trainer.max_steps=3")  # fmt: skip
    assert_ok(ddp)
    logged = scalars(tmp_path / "ddp" / "finetune_task" / "version_0")
    assert [step for step, _ in logged["val/reverse-words/exact_match"]] == [2] and "val/loss" in logged
