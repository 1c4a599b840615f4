import itertools

import pytest
import torch

from gpt_lightning.generate import generate, generate_tokens, sample_next, stream_text
from gpt_lightning.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()


def run(model, use_kv_cache, seed=0, n=40, **kwargs):
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    return generate(model, idx, n, generator=torch.Generator().manual_seed(seed), use_kv_cache=use_kv_cache, **kwargs)


def test_kv_cache_output_is_identical_including_past_block_size(model):
    # 3 prompt + 40 new tokens: the window slides past block_size 12 many times
    with_cache, without = run(model, True), run(model, False)
    assert with_cache.shape == (2, 43)
    assert torch.equal(with_cache, without)


def test_same_seed_same_tokens_other_seed_differs(model):
    assert torch.equal(run(model, True, seed=1), run(model, True, seed=1))
    assert not torch.equal(run(model, True, seed=1), run(model, True, seed=2))


def test_temperature_zero_is_argmax(model):
    out = run(model, True, temperature=0.0, n=5)
    idx = out[:, :3]
    for t in range(3, 8):
        expected = model(idx[:, -12:])[:, -1].argmax(-1)
        assert torch.equal(out[:, t], expected)
        idx = out[:, : t + 1]


def test_top_k_one_is_greedy(model):
    assert torch.equal(run(model, True, top_k=1, seed=3), run(model, True, temperature=0.0))


def test_max_new_tokens_is_respected(model):
    tokens = list(generate_tokens(model, torch.tensor([[1]]), 7))
    assert len(tokens) == 7 and all(t.shape == (1,) for t in tokens)


def test_top_k_is_clamped_to_vocabulary():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert sample_next(logits, top_k=1000, generator=torch.Generator().manual_seed(0)).shape == (1,)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two, so token 2 is never drawn
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(2000, 1)
    drawn = sample_next(logits, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05
    assert set(sample_next(logits, top_p=0.4, generator=torch.Generator().manual_seed(0)).tolist()) == {0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(1, 3), **kwargs)


def test_stream_text_is_the_decoded_tokens_and_stops_when_cancelled(model):
    from gpt_lightning.tokenizer import CharTokenizer

    tokenizer = CharTokenizer([chr(97 + i) for i in range(model.config.vocab_size)])
    prompt = tokenizer.decode([1, 2, 3])
    tokens = generate_tokens(model, tokenizer.encode(prompt)[None], 30, 0.8, generator=torch.Generator().manual_seed(5))
    expected = tokenizer.decode(torch.cat(list(tokens)))
    pieces = list(stream_text(model, tokenizer, prompt, 30, 0.8, generator=torch.Generator().manual_seed(5)))
    assert "".join(pieces) == expected and len(pieces) == 30  # one character per token
    questions = itertools.count(1)
    stopped = stream_text(model, tokenizer, prompt, 30, 0.8, cancelled=lambda: next(questions) > 7)
    assert len(list(stopped)) == 7  # asked before each token: 7 tokens, then the 8th question stops it
