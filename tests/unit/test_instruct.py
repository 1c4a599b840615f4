"""Task data: the three formats, errors that name the line, templates, masking of the prompt, padding and
packing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt_lightning.data.instruct import (
    IGNORE_INDEX,
    TEMPLATES,
    Example,
    Message,
    TaskDataError,
    collate,
    encode_example,
    first_fit,
    missing_characters,
    pack,
    pack_rows,
    parse_examples,
    read_examples,
    render_prompt,
)
from gpt_lightning.tokenizer import CharTokenizer
from gpt_lightning.training.module import GPTModule
from tests.probe import HOST_READS

PLAIN, CHAT = TEMPLATES["plain"], TEMPLATES["chat"]
VOCAB = "".join(sorted(set("\n !$:<>|ABQabcdefghijklmnopqrstuvwxyz0123456789+=")))


def jsonl(*rows: object) -> str:
    return "\n".join(json.dumps(row) for row in rows) + "\n"


def test_the_three_formats_read_as_the_same_conversation(tmp_path: Path):
    expected = (Message("user", "add\n\n2+3"), Message("assistant", "5"))
    files = {
        "instruction": jsonl({"instruction": "add", "input": "2+3", "output": "5"}),
        "completion": jsonl({"prompt": "add\n\n2+3", "completion": "5"}),
        "messages": jsonl(
            {"messages": [{"role": "user", "content": "add\n\n2+3"}, {"role": "assistant", "content": "5"}]}
        ),
    }
    for form, text in files.items():
        path = tmp_path / f"{form}.jsonl"
        path.write_text(text)
        for declared in ("auto", form):
            [example] = read_examples(path, declared)  # type: ignore[arg-type]
            assert example.messages == expected, form
            assert example.where == f"{path} line 1"
    [no_input] = parse_examples(jsonl({"instruction": "greet", "input": "", "output": "hi"}), "f")
    assert no_input.messages[0] == Message("user", "greet")


def test_multi_turn_messages_keep_every_turn():
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                        {"role": "assistant", "content": "farewell"}]}  # fmt: skip
    [example] = parse_examples(jsonl(row), "chat.jsonl")
    assert [m.role for m in example.messages] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "a", "completion": ', "not a JSON object"),
        ("[1, 2]", "not a JSON object but a JSON list"),
        ('{"question": "a"}', "a completion example lacks 'prompt' (it has question)"),
        ('{"instruction": "a", "output": "b"}', "a completion example lacks 'prompt'"),
        ('{"prompt": "a", "completion": 5}', "completion must be a string, got 5"),
        ('{"messages": [{"role": "bot", "content": "a"}]}', "role \"bot\""),
        ('{"messages": [{"role": "user", "content": "a"}]}', "the last message is the user's"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
         '{"role": "assistant", "content": "c"}]}', "message 1 is a system message"),
        ('{"messages": []}', "messages must be a non-empty list"),
    ],
)  # fmt: skip
def test_a_bad_line_names_the_file_the_line_and_the_problem(line: str, problem: str, tmp_path: Path):
    path = tmp_path / "task.jsonl"
    first = json.dumps({"prompt": "x", "completion": "y"}) if "messages" not in line else json.dumps(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})  # fmt: skip
    path.write_text(f"{first}\n\n{line}\n")
    with pytest.raises(TaskDataError) as error:
        read_examples(path)
    assert str(error.value).startswith(f"{path} line 3: "), error.value
    assert problem in str(error.value)


def test_an_unknown_first_line_an_empty_file_and_an_unknown_format_are_errors():
    with pytest.raises(TaskDataError, match="f line 1: not a task example: it has question"):
        parse_examples(jsonl({"question": "a"}), "f")
    with pytest.raises(TaskDataError, match="holds no examples"):
        parse_examples("\n\n", "empty.jsonl")
    with pytest.raises(TaskDataError, match="data.format must be"):
        parse_examples(jsonl({"prompt": "a", "completion": "b"}), "f", "alpaca")  # type: ignore[arg-type]


def test_templates_render_a_prompt_where_the_model_answers():
    assert render_prompt(PLAIN, "olleh") == "Q: olleh\nA: "
    assert render_prompt(CHAT, "hi") == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]  # fmt: skip
    assert render_prompt(CHAT, conversation) == (
        "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n<|user|>\nbye<|end|>\n"
        "<|assistant|>\n"
    )
    assert render_prompt(None, "To be") == "To be"  # a base model reads the prompt as it is
    with pytest.raises(ValueError, match="no template"):
        render_prompt(None, conversation)
    with pytest.raises(ValueError, match="the last one not the assistant's"):
        render_prompt(CHAT, [*conversation, {"role": "assistant", "content": "x"}])


def learned_text(tokenizer: CharTokenizer, targets: torch.Tensor) -> str:
    return tokenizer.decode(targets[targets != IGNORE_INDEX])


def test_only_the_assistant_turns_and_their_end_markers_are_learned():
    tokenizer = CharTokenizer(VOCAB)
    example = Example((Message("user", "ab"), Message("assistant", "ba"), Message("user", "cd"),
                       Message("assistant", "dc")), "x")  # fmt: skip
    inputs, targets = encode_example(tokenizer, PLAIN, example)
    assert tokenizer.decode(inputs) + "$" == "Q: ab\nA: ba$\nQ: cd\nA: dc$"  # the last token is only a target
    assert learned_text(tokenizer, targets) == "ba$dc$"
    # every learned target is the next token, in place
    full = tokenizer.encode("Q: ab\nA: ba$\nQ: cd\nA: dc$")
    assert torch.equal(targets[targets != IGNORE_INDEX], full[1:][targets != IGNORE_INDEX])
    _, everything = encode_example(tokenizer, PLAIN, example, train_on_prompt=True)
    assert torch.equal(everything, full[1:])


def test_missing_characters_say_where_each_first_occurs():
    tokenizer = CharTokenizer("\n $:AQabc")
    examples = [Example((Message("user", "ab1"), Message("assistant", "c+2")), "t.jsonl line 1"),
                Example((Message("user", "1#"), Message("assistant", "a")), "t.jsonl line 2")]  # fmt: skip
    assert missing_characters(tokenizer, PLAIN, examples) == {
        "1": "t.jsonl line 1", "+": "t.jsonl line 1", "2": "t.jsonl line 1", "#": "t.jsonl line 2",
    }  # fmt: skip
    chat_markers = set(missing_characters(tokenizer, CHAT, []))
    assert chat_markers == set(CHAT.markers) - set(tokenizer.vocab) == set("<|>ysteumrnid")


def tiny_module() -> GPTModule:
    torch.manual_seed(0)
    return GPTModule(vocab=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=16)


def encoded(*pairs: tuple[str, str], train_on_prompt: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokenizer = CharTokenizer(VOCAB)
    examples = [Example((Message("user", p), Message("assistant", r)), "x") for p, r in pairs]
    return [encode_example(tokenizer, PLAIN, e, train_on_prompt) for e in examples]


def batch_of(*pairs: tuple[str, str], train_on_prompt: bool = False):
    return collate(encoded(*pairs, train_on_prompt=train_on_prompt))


def logit_gradients(module: GPTModule, batch) -> torch.Tensor:
    """d loss / d logits, through the module's own training loss."""
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    handle = module.gpt.lm_head.register_forward_hook(keep)
    try:
        module._loss(batch).backward()
    finally:
        handle.remove()
    assert captured[0].grad is not None
    return captured[0].grad


def test_the_prompts_tokens_contribute_exactly_nothing_to_the_gradient():
    module = tiny_module()
    batch = batch_of(("12+34", "46"), ("7+8", "15"))
    grad = logit_gradients(module, batch)  # (B, T, V)
    masked = batch.targets == IGNORE_INDEX  # the prompt's positions and the padding
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(grad[masked]) == 0  # exactly zero, not small
    assert (grad[~masked].abs().sum(dim=-1) > 0).all()  # every learned position has a gradient
    # and the weights' gradient is that of the loss over the responses alone
    module.zero_grad()
    logits = module.gpt(batch.inputs)
    learned = ~masked
    manual = F.cross_entropy(logits[learned], batch.targets[learned])
    assert torch.allclose(manual, module._loss(batch), atol=0, rtol=1e-6)
    # the test can fail: trained on the prompt too, the prompt's positions have gradients
    everything = batch_of(("12+34", "46"), ("7+8", "15"), train_on_prompt=True)
    grad_all = logit_gradients(tiny_module(), everything)
    prompt = masked & (everything.targets != IGNORE_INDEX)
    assert prompt.any() and (grad_all[prompt].abs().sum(dim=-1) > 0).all()


def test_a_padded_batch_gives_the_loss_of_its_examples_one_at_a_time():
    module = tiny_module().eval()
    pairs = [("12+34", "46"), ("7+8", "15"), ("100+900", "1000")]
    batch = batch_of(*pairs)
    assert batch.inputs.shape[1] == max(int(n) for n in batch.lengths) and batch.padding > 0
    padded = module._loss(batch)
    sums, counts = [], []
    for pair in pairs:
        alone = batch_of(pair)
        assert alone.padding == 0
        learned = int((alone.targets != IGNORE_INDEX).sum())
        sums.append(module._loss(alone) * learned)
        counts.append(learned)
        # padding after an example changes none of its logits
        row = pairs.index(pair)
        length = int(alone.lengths[0])
        assert torch.allclose(module.gpt(alone.inputs)[0], module.gpt(batch.inputs)[row, :length], atol=1e-6)
    assert torch.allclose(padded, sum(sums) / sum(counts), atol=1e-6)


def test_validation_scores_the_learned_tokens_only(monkeypatch: pytest.MonkeyPatch):
    module = tiny_module().eval()
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # outside a Trainer
    batch = batch_of(("12+34", "46"), ("100+900", "1000"))
    with torch.no_grad():
        module.validation_step(batch, 0)
        expected = module._loss(batch)
    learned = int((batch.targets != IGNORE_INDEX).sum())
    assert module.val_loss.compute() == pytest.approx(expected.item(), rel=1e-6)
    assert module.val_bpc.compute() == pytest.approx(expected.item() / math.log(2), rel=1e-6)  # a character a token
    assert module.val_loss.weight == learned


def test_a_template_that_marks_every_role_is_a_chat_template():
    # serve answers /v1/chat/completions for a fine-tune in one: each turn of a conversation reads apart
    assert CHAT.is_chat and not PLAIN.is_chat  # plain has no system marker: a system message would read as a user's


# -- packing ---------------------------------------------------------------------------------------------------

SUMS = [("12+34", "46"), ("7+8", "15"), ("100+900", "1000"), ("5+5", "10"), ("99+1", "100"), ("3+4", "7")]


def test_first_fit_packs_the_longest_first_loses_no_example_and_depends_on_the_lengths_alone():
    assert first_fit([5, 4, 3, 2], 8) == [[0, 2], [1, 3]]  # 5, then 4 (no room beside 5), 3 beside 5, 2 beside 4
    lengths = [int(n) for n in torch.randint(1, 30, (200,), generator=torch.Generator().manual_seed(0))]
    rows = first_fit(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(200))  # every example once
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
    assert sum(sum(lengths[i] for i in row) <= 16 for row in rows) <= 1  # first fit: one row half empty at most
    assert first_fit(lengths, 32) == rows and first_fit([3, 3, 3], 6) == [[0, 1], [2]]  # ties keep their order
    with pytest.raises(ValueError, match="longer than the rows"):
        first_fit([5, 9], 8)


def test_a_packed_batch_gives_the_padded_batchs_loss_per_token_losses_and_gradients():
    module = tiny_module().eval()
    pairs = encoded(*SUMS)
    padded, packed = collate(pairs), pack(pairs, width=32)
    assert packed.inputs.shape[0] < padded.inputs.shape[0] and packed.inputs.shape[1] <= 32
    assert packed.padding < padded.padding
    assert int(packed.lengths.sum()) == int(padded.lengths.sum()) == sum(x.numel() for x, _ in pairs)
    losses = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        module.zero_grad()
        loss = module._loss(batch)
        loss.backward()
        logits = module.gpt(batch.inputs, segments=batch.segments)
        each = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view_as(batch.targets)
        losses[name] = (loss.detach(), each.detach(), {n: p.grad.clone() for n, p in module.named_parameters()})
    (padded_loss, padded_each, padded_grads), (packed_loss, packed_each, packed_grads) = losses.values()
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-6)
    for i, (x, _) in enumerate(pairs):  # each example's tokens, where the pack put them
        assert torch.equal(packed.inputs[packed.segments == i], x)
        torch.testing.assert_close(packed_each[packed.segments == i], padded_each[i, : x.numel()], atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # the test can fail: the same rows read as one text each (no segments) give another loss
    assert not torch.allclose(module._loss(packed._replace(segments=None)), padded_loss, atol=1e-4)


def test_changing_one_packed_example_changes_no_logit_of_the_others():
    module = tiny_module().eval()
    pairs = encoded(*SUMS)
    packed = pack(pairs, width=32)
    other = pack([*pairs[:2], *encoded(("100+901", "1001")), *pairs[3:]], width=32)  # example 2, as long, changed
    assert torch.equal(other.segments, packed.segments)
    changed = packed.segments == 2
    a, b = module.gpt(packed.inputs, segments=packed.segments), module.gpt(other.inputs, segments=other.segments)
    assert torch.equal(a[~changed], b[~changed]) and not torch.allclose(a[changed], b[changed])


def positions(lengths: list[int], rows: list[list[int]]) -> int:
    """A batch's positions: its rows, each padded to the fullest."""
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def test_packing_chooses_the_row_width_that_pads_least_and_never_pads_more_than_one_example_a_row():
    assert pack_rows([5, 4, 3, 2], 8) == [[0], [1], [2, 3]]  # 15 positions in rows of 5, where rows of 8 take 16
    lengths = [17] * 6 + [16] * 4  # rows of 64: two of three 17s, padded to the 64 of the four 16s
    assert positions(lengths, first_fit(lengths, 64)) == 192 and positions(lengths, pack_rows(lengths, 64)) == 170
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = [int(n) for n in torch.randint(1, 30, (int(torch.randint(1, 40, (1,), generator=generator)),),
                                                 generator=generator)]  # fmt: skip
        rows = pack_rows(lengths, 64)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths))) and rows == pack_rows(lengths, 64)
        assert positions(lengths, rows) <= len(lengths) * max(lengths)


def test_packed_padding_is_its_own_segment_and_the_padding_fraction_counts_it():
    pairs = [(torch.arange(n), torch.arange(n)) for n in (5, 4, 3, 2)]
    batch = pack(pairs, width=8)
    assert batch.segments.tolist() == [[0] * 5, [1] * 4 + [-1], [2] * 3 + [3] * 2]
    assert batch.lengths.tolist() == [5, 4, 5] and batch.padding == pytest.approx(1 / 15)
    assert batch.targets[1, 4:].tolist() == [IGNORE_INDEX] and batch.inputs[1, 4:].tolist() == [0]
    assert collate(pairs).padding == pytest.approx(6 / 20)


def test_a_training_step_on_a_packed_batch_reads_no_tensor_back(monkeypatch: pytest.MonkeyPatch):
    module = tiny_module()
    batch = pack(encoded(*SUMS), width=32)
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(tensor, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    module._loss(batch).backward()  # the mask and positions are built on the device, from the segments
    monkeypatch.undo()
    assert reads == []
