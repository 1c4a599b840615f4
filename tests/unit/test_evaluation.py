"""Task scores: multiple choice (HellaSwag's format), generation with exact match, bits per byte of a text,
the built-in tasks made from the held-out split, and `evaluate`'s table and JSON. Tiny models whose logits are
known (a bigram table), or a small random GPT checked against plain full forward passes; generated text only."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt_lightning.evaluation.builtin as builtin
from gpt_lightning.evaluation import (
    ChoiceItem,
    GenerationItem,
    TaskFormatError,
    builtin_task,
    choice_metrics,
    evaluate,
    generation_metrics,
    held_out_text,
    read_task,
    resolve_task,
    score_choices,
    score_generations,
    score_text,
    text_metrics,
)
from gpt_lightning.model import GPT, GPTConfig, KVCache
from gpt_lightning.sources import METADATA_KEY, metadata
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer
from tests.conftest import WORDS, make_play

VOCAB = " .abcdeé\n"  # é: two UTF-8 bytes, so bytes and characters differ


class Bigram(nn.Module):
    """A language model with known logits: those after token t are row t of `table`, whatever came before."""

    def __init__(self, table: torch.Tensor, block_size: int) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = GPTConfig(vocab_size=table.size(0), block_size=block_size, n_layer=1, n_head=1, n_embd=4)

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        assert pos + idx.size(1) <= self.config.block_size, "ran past block_size"
        return self.table[idx]

    def new_kv_caches(self, batch_size: int) -> list[KVCache]:
        return [KVCache(batch_size, 1, self.config.block_size, 4, self.table.device, self.table.dtype)]


def bigram(block_size: int = 64, seed: int = 0) -> tuple[Bigram, CharTokenizer, list[list[float]]]:
    """The model, its tokenizer and log p(next | previous) as plain floats, for computing losses by hand."""
    generator = torch.Generator().manual_seed(seed)
    table = 2 * torch.randn(len(VOCAB), len(VOCAB), generator=generator)
    return Bigram(table, block_size), CharTokenizer(VOCAB), F.log_softmax(table, dim=-1).tolist()


def nats(logp: list[list[float]], text: str, start: int) -> float:
    """By hand: the loss of text[start:] given what comes before it, one character (token) at a time."""
    return -sum(logp[VOCAB.index(text[i - 1])][VOCAB.index(text[i])] for i in range(start, len(text)))


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# -- multiple choice -----------------------------------------------------------------------------------------


def test_hellaswag_file_gives_acc_and_acc_norm_of_a_hand_computation(tmp_path: Path):
    model, tokenizer, logp = bigram()
    rng = torch.Generator().manual_seed(1)

    def word(n: int) -> str:
        return "".join(VOCAB[2 + int(i)] for i in torch.randint(6, (n,), generator=rng))

    # HellaSwag's own rows (its other fields too); endings of very different lengths, so that the summed and
    # the mean loss disagree on some items
    rows = [
        {"ind": i, "activity_label": "Testing", "ctx_a": "", "ctx_b": "", "ctx": f"{word(5)} {word(3)}.",
         "endings": [word(1), word(4) + " " + word(6), word(2), word(9)], "label": i % 4, "split": "val",
         "split_type": "indomain", "source_id": f"gen~{i}"}
        for i in range(40)
    ]  # fmt: skip
    task = read_task(str(write_jsonl(tmp_path / "hellaswag_val.jsonl", rows)))
    assert task.name == "hellaswag_val" and len(task.items) == 40
    scores = score_choices(model, tokenizer, task.items, batch_size=3)

    correct = {"acc": 0, "acc_norm": 0, "acc_norm_bytes": 0}
    for row, score in zip(rows, scores, strict=True):
        # build-nanogpt's way: each ending after the context and a space; only the ending's tokens are scored
        losses = [nats(logp, row["ctx"] + " " + end, len(row["ctx"])) for end in row["endings"]]
        assert score.losses == pytest.approx(losses, rel=1e-5)
        tokens = [len(end) + 1 for end in row["endings"]]
        per_byte = [-loss / len(end.encode()) for loss, end in zip(losses, row["endings"], strict=True)]
        correct["acc"] += min(range(4), key=lambda i: losses[i]) == row["label"]
        correct["acc_norm"] += min(range(4), key=lambda i: losses[i] / tokens[i]) == row["label"]
        correct["acc_norm_bytes"] += max(range(4), key=lambda i: per_byte[i]) == row["label"]
    assert len(set(correct.values())) == 3, "the items do not tell the three metrics apart"

    metrics = {m.name: m for m in choice_metrics(scores)}
    for name, count in correct.items():
        p = count / 40
        assert metrics[name].value == pytest.approx(p)
        assert metrics[name].stderr == pytest.approx(math.sqrt(p * (1 - p) / 39))  # lm-eval's sample stderr
        assert metrics[name].n == 40 and metrics[name].chance == pytest.approx(0.25)

    # the generic format reads the same items: its choices follow the context exactly as written
    generic = [{"context": r["ctx"], "choices": [" " + e for e in r["endings"]], "label": r["label"]} for r in rows]
    again = score_choices(model, tokenizer, read_task(str(write_jsonl(tmp_path / "g.jsonl", generic))).items)
    assert [loss for s in again for loss in s.losses] == pytest.approx([loss for s in scores for loss in s.losses])


def random_gpt(block_size: int, vocab_size: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # logits far from uniform: an off-by-one position shows
    return model.eval()


def test_context_once_then_endings_as_a_batch_equals_a_full_forward_of_each(tmp_path: Path):
    tokenizer = CharTokenizer.from_text(" ".join(WORDS) + ".")
    model = random_gpt(block_size=24, vocab_size=tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=generator))

    items = [
        ChoiceItem(context=words(2), choices=(" a", " " + words(2), "s", " " + words(3) + "."), label=1, where="1"),
        ChoiceItem(context=words(6), choices=(" " + words(1), " " + words(3)), label=0, where="2"),  # > block_size
        ChoiceItem(context="o", choices=(" " + words(4), "f"), label=0, where="3"),  # fits only just, or not
    ]
    for batch_size in (1, 2, 8):
        scores = score_choices(model, tokenizer, items, batch_size=batch_size)
        for item, score in zip(items, scores, strict=True):
            for choice, loss in zip(item.choices, score.losses, strict=True):
                context, ending = tokenizer.encode(item.context), tokenizer.encode(choice)
                sequence = torch.cat([context, ending])
                inputs, targets = sequence[:-1][-24:], sequence[1:][-24:]  # cropped on the left to block_size
                expected = F.cross_entropy(
                    model(inputs[None])[0][-len(ending) :], targets[-len(ending) :], reduction="sum"
                )
                assert loss == pytest.approx(expected.item(), abs=1e-4), (item.where, choice, batch_size)
    # both ways are taken: the context once (items 1 and 3), and whole sequences cropped on the left (item 2)
    fits = [len(i.context) + max(len(c) for c in i.choices) - 1 <= 24 for i in items]
    assert fits == [True, False, True]


def test_each_choice_says_whether_it_is_the_greedy_continuation_after_one_context_or_as_a_whole_sequence():
    model, tokenizer = chain_model(".abc de\nb")  # after "." greedy writes "abc de\nbc de\nbc..."
    choices = ("abc", "abd", "a", "bc de")
    short = ChoiceItem(context="e.", choices=choices, label=0, where="short")
    long = ChoiceItem(context="abc de\nbc de\ne.", choices=choices, label=0, where="long")  # 15 + 5 - 1 > 16
    for batch_size in (1, 3):
        for score in score_choices(model, tokenizer, [short, long], batch_size=batch_size):
            assert score.greedy == (True, False, True, False), (score.where, batch_size)


def test_a_choice_longer_than_the_context_window_is_an_error_naming_its_line(tmp_path: Path):
    model, tokenizer, _ = bigram(block_size=8)
    path = write_jsonl(tmp_path / "long.jsonl", [{"context": "ab", "choices": ["a", "abcdeabcde"], "label": 0}])
    with pytest.raises(ValueError, match=r"long\.jsonl line 1: choice 1 is 10 tokens.*block_size 8"):
        score_choices(model, tokenizer, read_task(str(path)).items)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"context": "ab", "choices": ["a", "xyz"], "label": 0}])
    with pytest.raises(ValueError, match=r"unknown\.jsonl line 1: .*'x'"):
        score_choices(model, tokenizer, read_task(str(unknown)).items)


# -- generation -------------------------------------------------------------------------------------------------


def chain_model(chain: str) -> tuple[Bigram, CharTokenizer]:
    """Greedy decoding from the bigram follows `chain`: after chain[i] comes chain[i + 1]."""
    table = torch.zeros(len(VOCAB), len(VOCAB))
    for a, b in itertools.pairwise(chain):
        table[VOCAB.index(a), VOCAB.index(b)] = 5.0
    return Bigram(table, block_size=16), CharTokenizer(VOCAB)


def test_generation_decodes_greedily_until_a_stop_string_and_compares_normalized_answers(tmp_path: Path):
    model, tokenizer = chain_model(".abc de\nb")  # after "." greedy writes "abc de\nbc de\nbc..."
    rows = [
        {"prompt": "e.", "answer": "abc de"},  # the default stop: a line break
        {"prompt": "e.", "answer": "  abc   de ", "stop": "\n"},  # whitespace normalized away
        {"prompt": "e.", "answer": "abc", "stop": [" d", "\n"]},  # the first stop that occurs ends it
        {"prompt": "e.", "answer": "ABC DE"},  # case is kept
        {"prompt": "e.", "answer": "abc de bc", "stop": []},  # no stop string: the token limit ends it
    ]
    task = read_task(str(write_jsonl(tmp_path / "qa.jsonl", rows)))
    scores = score_generations(model, tokenizer, task.items, max_new_tokens=9)
    assert [s.prediction for s in scores] == ["abc de", "abc de", "abc", "abc de", "abc de\nbc"]
    assert [s.correct for s in scores] == [True, True, True, False, True]
    [metric] = generation_metrics(scores)
    assert (metric.name, metric.value, metric.n, metric.chance) == ("exact_match", 0.8, 5, 0.0)
    assert metric.stderr == pytest.approx(math.sqrt(0.8 * 0.2 / 4))
    ignoring_case = score_generations(model, tokenizer, task.items, max_new_tokens=9, ignore_case=True)
    assert ignoring_case[3].correct
    short = score_generations(model, tokenizer, [GenerationItem("e.", "ab", (), "x")], max_new_tokens=2)
    assert short[0].prediction == "ab" and short[0].correct


# -- language modelling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [None, 5])
def test_bits_per_byte_and_per_character_equal_a_hand_computation(stride: int | None):
    model, tokenizer, logp = bigram(block_size=16)
    text = "abé cad. bée\nada. " * 7  # 126 characters: eight windows of 16, the last one overlapping
    scores = score_text(model, tokenizer, text, batch_size=3, stride=stride)
    bits = nats(logp, text, 1) / math.log(2)  # every token but the first, which nothing predicts, once
    metrics = {m.name: m for m in text_metrics(scores, tokenizer.vocab_size)}
    assert metrics["bits_per_byte"].value == pytest.approx(bits / len(text[1:].encode()), rel=1e-6)
    assert metrics["bits_per_char"].value == pytest.approx(bits / len(text[1:]), rel=1e-6)
    assert sum(s.tokens for s in scores) == len(text) - 1
    uniform = (len(text) - 1) * math.log2(len(VOCAB))  # chance: a uniform guess over the vocabulary
    assert metrics["bits_per_byte"].chance == pytest.approx(uniform / len(text[1:].encode()))


def test_sliding_windows_give_every_token_the_context_its_stride_promises():
    tokenizer = CharTokenizer(VOCAB)
    model = random_gpt(block_size=8, vocab_size=len(VOCAB))
    text = "abcde. ébadc\ncab eda. dé" * 2
    ids = tokenizer.encode(text)
    by_hand = bits_by_hand(model, ids, context=8)
    scores = score_text(model, tokenizer, text, batch_size=4, stride=1)  # every token after a full window
    assert sum(s.bits for s in scores) == pytest.approx(by_hand, rel=1e-5)
    non_overlapping = sum(s.bits for s in score_text(model, tokenizer, text, batch_size=4))
    assert non_overlapping != pytest.approx(by_hand, rel=1e-3)  # shorter contexts: another number


def bits_by_hand(model: GPT, ids: torch.Tensor, context: int) -> float:
    """By hand: each token j >= 1 predicted from the `context` tokens before it (fewer at the start)."""
    total = 0.0
    for j in range(1, ids.numel()):
        window = ids[max(0, j - context) : j]
        total -= F.log_softmax(model(window[None])[0, -1], dim=-1)[ids[j]].item()
    return total / math.log(2)


def test_bits_per_byte_of_a_bpe_model_counts_the_bytes_its_tokens_stand_for(tmp_path: Path):
    from tests.unit.test_hf import train_bpe

    bpe = BPETokenizer.from_file(train_bpe(tmp_path / "tokenizer.json"))
    model = Bigram(torch.zeros(bpe.vocab_size, bpe.vocab_size), block_size=16)  # uniform: log2 V bits a token
    text = "KING ARTHUR:\nGood lord, my king! Ça va, 東京.\n" * 3
    ids = bpe.encode(text)
    [metric] = [m for m in text_metrics(score_text(model, bpe, text), bpe.vocab_size) if m.name == "bits_per_byte"]
    first = len(bpe.decode(ids[:1]).encode())  # the first token, which nothing predicts, is not scored
    assert ids.numel() < len(text.encode())  # several bytes a token
    assert metric.value == pytest.approx((ids.numel() - 1) * math.log2(bpe.vocab_size) / (len(text.encode()) - first))


# -- built-in tasks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["spelling", "next-word", "next-line", "who-speaks"])
def test_builtin_tasks_are_deterministic_and_made_of_held_out_text_only(play_corpus: Path, name: str):
    text = play_corpus.read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9) :]
    assert held_out_text(text) == held_out
    task = builtin_task(name, data_dir="unused", seed=7)
    assert len(task.items) >= 30
    assert builtin_task(name, data_dir="unused", seed=7).items == task.items
    assert builtin_task(name, data_dir="unused", seed=8).items != task.items
    assert task.source["corpus_sha256"] == hashlib.sha256(play_corpus.read_bytes()).hexdigest()
    assert task.source["seed"] == 7 and task.source["generator"].endswith(name.replace("-", "_"))
    lines = set(held_out.split("\n"))
    for item in task.items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.context + item.choices[item.label] in held_out  # the real continuation, in place
        if name in ("spelling", "next-word"):
            assert len({len(choice) for choice in item.choices}) == 1  # length tells nothing
            assert item.context[-1:] in ("", " ", "\n") or not item.context[-1].isalpha()  # a whole word follows
        if name == "spelling":
            words = set(re.findall(r"[a-z]+", held_out))
            (after,) = {choice[-1] for choice in item.choices}
            assert not after.isalpha()  # each choice ends the word as the text does
            wrong = [choice[:-1] for k, choice in enumerate(item.choices) if k != item.label]
            assert not words & set(wrong)  # no misspelling is a word of the split
            assert len({choice[0] for choice in item.choices}) == 1  # the first letter stays
        elif name == "next-word":
            assert all(re.search(rf"(?<![A-Za-z]){choice}(?![A-Za-z])", held_out) for choice in item.choices)
        elif name == "next-line":
            assert all(choice in lines for choice in item.choices)  # lines from elsewhere in the split
            assert len({len(choice) // builtin.LENGTH_BUCKET for choice in item.choices}) == 1  # length tells nothing
        else:
            names = [choice.split(":\n")[0] for choice in item.choices]
            assert all(f"\n\n{n}:\n" in held_out for n in names)  # speakers of the split
            assert len({choice.split(":\n")[1] for choice in item.choices}) == 1  # one speech, four names


# -- task files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not a JSON object"),
        ('["ctx", "endings"]', "not a JSON object"),
        ('{"ctx": "a", "endings": ["b", "c"]}', "lacks 'label'"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "label 2 is not the index of one of its 2 choices"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": "x"}', "label must be"),
        ('{"ctx": "a", "endings": "b", "label": 0}', "endings must be a list of at least 2 non-empty strings"),
        ('{"ctx": "a", "endings": ["b", ""], "label": 0}', "endings must be a list of at least 2 non-empty strings"),
        ('{"ctx": "", "endings": ["b", "c"], "label": 0}', "ctx must be a non-empty string"),
        ('{"prompt": "a", "answer": "b"}', "a multiple-choice item"),
    ],
)
def test_a_bad_line_is_an_error_naming_the_file_the_line_and_the_problem(tmp_path: Path, line: str, problem: str):
    good = '{"ctx": "a", "endings": ["b", "c"], "label": 1}'
    path = tmp_path / "task.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")  # a blank line is skipped, but counted
    with pytest.raises(TaskFormatError, match=rf"{path} line 3: .*{problem}"):
        read_task(str(path))


def test_task_kinds_come_from_the_fields_or_a_prefix_and_other_files_are_text(tmp_path: Path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "answer": "b", "stop": ["\n", "."]}])
    assert read_task(str(qa)).items == [GenerationItem("a", "b", ("\n", "."), f"{qa} line 1")]
    text = tmp_path / "notes.txt"
    text.write_text("some text\n", encoding="utf-8")
    assert read_task(str(text)).text == "some text\n"
    assert read_task(f"lm:{qa}").text == qa.read_text(encoding="utf-8")  # a JSONL file read as text
    with pytest.raises(TaskFormatError, match="a generation item"):
        read_task(
            f"generation:{write_jsonl(tmp_path / 'mc.jsonl', [{'context': 'a', 'choices': ['b', 'c'], 'label': 0}])}"
        )
    with pytest.raises(TaskFormatError, match="holds no items"):
        read_task(str(write_jsonl(tmp_path / "empty.jsonl", [""])))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl is neither a built-in task .*next-line.* nor a file"):
        resolve_task("nowhere.jsonl", data_dir="data", seed=0)


# -- evaluate ---------------------------------------------------------------------------------------------------


def tiny_checkpoint(path: Path, text: str) -> Path:
    tokenizer = CharTokenizer.from_text(text)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    state = {f"gpt.{k}": v for k, v in GPT(config).state_dict().items()}
    torch.save({"state_dict": state, "global_step": 12, METADATA_KEY: metadata(config, tokenizer)}, path)
    return path


def test_evaluate_prints_a_table_and_writes_a_json_that_records_sources_and_settings(
    play_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    text = play_corpus.read_text(encoding="utf-8")
    checkpoint = tiny_checkpoint(tmp_path / "tiny.ckpt", text)
    choices = write_jsonl(tmp_path / "mc.jsonl", [{"context": "KING", "choices": [" lord", " o"], "label": 0}] * 3)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "KING ", "answer": "ARTHUR"}])
    prose = tmp_path / "prose.txt"
    prose.write_text(make_play(5, seed=9), encoding="utf-8")
    output = tmp_path / "out" / "scores.json"
    tasks = ["next-line", str(choices), str(qa), str(prose)]

    result = evaluate(str(checkpoint), tasks, output=str(output), limit=20, max_new_tokens=4, seed=5)

    table = capsys.readouterr().out
    assert table.split("\n")[0].split() == ["task", "metric", "value", "stderr", "n", "chance"]
    assert "next-line" in table and "acc_norm_bytes" in table and "bits_per_byte" in table
    assert "lowest mean loss per token (build-nanogpt)" in table  # which normalization is which
    written = json.loads(output.read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(result))
    assert written["model"]["source"] == str(checkpoint)
    assert written["model"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert written["model"]["global_step"] == 12
    assert written["settings"] == {"limit": 20, "batch_size": 8, "max_new_tokens": 4, "device": "cpu",
                                   "data_dir": "data", "seed": 5, "ignore_case": False, "stride": None}  # fmt: skip
    by_name = {t["name"]: t for t in written["tasks"]}
    assert list(by_name) == ["next-line", "mc", "qa", "prose"]
    assert by_name["next-line"]["source"]["corpus_sha256"] == hashlib.sha256(play_corpus.read_bytes()).hexdigest()
    assert by_name["next-line"]["source"]["seed"] == 5
    for name, path in (("mc", choices), ("qa", qa), ("prose", prose)):
        assert by_name[name]["source"] == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    acc = by_name["next-line"]["metrics"]["acc"]
    assert acc["n"] == 20 and acc["chance"] == 0.25 and 0 <= acc["value"] <= 1 and acc["stderr"] > 0
    assert by_name["mc"]["metrics"]["acc"]["n"] == 3 and by_name["mc"]["metrics"]["acc"]["chance"] == 0.5
    assert by_name["qa"]["metrics"]["exact_match"]["stderr"] is None  # one item: no sample standard error
    assert by_name["prose"]["metrics"]["bits_per_byte"]["value"] > 0

    before = output.read_bytes()
    with pytest.raises(FileExistsError, match="scores.json exists"):
        evaluate(str(checkpoint), tasks, output=str(output))
    assert output.read_bytes() == before
