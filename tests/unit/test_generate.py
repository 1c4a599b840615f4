import itertools

import pytest
import torch

from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sampling import (
    SamplingOptionError,
    SamplingOptions,
    StreamEnd,
    check_prompt,
    generate,
    generate_tokens,
    sample_next,
    stream_text,
)


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
    ("options", "option", "message"),
    [
        ({"temperature": -1.0}, "temperature", r"temperature must be >= 0 and finite"),
        ({"temperature": float("nan")}, "temperature", r"must be >= 0 and finite .*got nan"),
        ({"temperature": float("inf")}, "temperature", r"must be >= 0 and finite .*got inf"),
        ({"temperature": 10**400}, "temperature", r"must be >= 0 and finite"),  # an int no float can hold
        ({"temperature": "hot"}, "temperature", r"temperature must be a number"),
        ({"temperature": True}, "temperature", r"temperature must be a number"),
        ({"top_k": 0}, "top_k", r"top_k must be >= 1"),
        ({"top_k": 2.5}, "top_k", r"top_k must be an integer"),
        ({"top_p": 0.0}, "top_p", r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p", r"top_p must be in \(0, 1\]"),
        ({"top_p": float("nan")}, "top_p", r"top_p must be in \(0, 1\]"),
        ({"top_p": [0.5]}, "top_p", r"top_p must be a number"),
        ({"max_new_tokens": -1}, "max_new_tokens", r"max_new_tokens must be >= 0"),
        ({"max_new_tokens": 3.0}, "max_new_tokens", r"max_new_tokens must be an integer"),
        ({"seed": -1}, "seed", r"seed must be from 0 to 2\*\*64 - 1"),
        ({"seed": 2**64}, "seed", r"seed must be from 0 to 2\*\*64 - 1"),
        ({"seed": "1"}, "seed", r"seed must be an integer"),
    ],
)
def test_bad_sampling_options_are_one_line_errors_naming_the_option(options, option, message):
    with pytest.raises(SamplingOptionError, match=message) as raised:
        SamplingOptions(**options)
    assert raised.value.option == option and "\n" not in str(raised.value)
    if "seed" not in options:  # the library's entry point (it takes a generator, not a seed) checks the same way
        with pytest.raises(SamplingOptionError, match=message):
            next(generate_tokens(torch.nn.Identity(), torch.tensor([[1]]), **{"max_new_tokens": 1, **options}))


def test_the_options_are_checked_once_per_generation_not_per_token(model, monkeypatch):
    checks = []
    check = SamplingOptions.__post_init__
    monkeypatch.setattr(SamplingOptions, "__post_init__", lambda self: (checks.append(self), check(self))[1])
    assert len(list(generate_tokens(model, torch.tensor([[1]]), 20, 0.8, top_k=5, top_p=0.9))) == 20
    assert len(checks) == 1


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_in_the_limit_and_never_fails(model, temperature):
    assert torch.equal(run(model, True, temperature=temperature, n=20), run(model, True, temperature=0.0, n=20))


def test_a_tiny_top_p_keeps_the_most_likely_token():
    # 1e-300 is 0 in float32, where the cumulative probabilities are compared with it: every token was dropped.
    logits = torch.tensor([[0.0, 3.0, 1.0]]).repeat(50, 1)
    for top_p in (1e-300, 5e-324, 1e-8):
        assert set(sample_next(logits, 0.8, top_p=top_p, generator=torch.Generator().manual_seed(0)).tolist()) == {1}


def test_a_huge_temperature_is_uniform_in_the_limit():
    logits = torch.tensor([[0.0, 5.0, 10.0]]).repeat(3000, 1)
    for temperature in (1e30, 1e300):
        drawn = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
        shares = torch.bincount(drawn, minlength=3) / len(drawn)
        assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.05), (temperature, shares)


@pytest.mark.parametrize("prompt", ["\ud800", "KING \udfff", "\udcff"])  # the last: a byte that is not UTF-8 in argv
def test_a_prompt_with_a_lone_surrogate_is_refused_whatever_the_tokenizer(tmp_path, prompt):
    from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer
    from tests.unit.test_hf import train_bpe

    for tokenizer in (CharTokenizer.from_text("KING "), BPETokenizer.from_file(train_bpe(tmp_path / "bpe.json"))):
        with pytest.raises(ValueError, match=r"the prompt has a lone surrogate .* at character \d+"):
            check_prompt(tokenizer, prompt, what="the prompt")
        check_prompt(tokenizer, "KING", what="the prompt")  # whole characters pass


def test_stream_text_is_the_decoded_tokens_and_stops_when_cancelled(model):
    from gpt_lightning.tokenizer import CharTokenizer

    tokenizer = CharTokenizer([chr(97 + i) for i in range(model.config.vocab_size)])
    prompt = tokenizer.decode([1, 2, 3])
    tokens = generate_tokens(model, tokenizer.encode(prompt)[None], 30, 0.8, generator=torch.Generator().manual_seed(5))
    expected = tokenizer.decode(torch.cat(list(tokens)))
    options = SamplingOptions(max_new_tokens=30, seed=5)
    pieces = list(stream_text(model, tokenizer, prompt, options))  # seeded from the options, as generate seeds it
    assert "".join(pieces) == expected and len(pieces) == 30  # one character per token
    questions = itertools.count(1)
    stopped = stream_text(model, tokenizer, prompt, options, cancelled=lambda: next(questions) > 7)
    assert len(list(stopped)) == 7  # asked before each token: 7 tokens, then the 8th question stops it


def test_stream_text_stops_before_a_stop_string_and_never_shows_it(model):
    from gpt_lightning.tokenizer import CharTokenizer

    tokenizer = CharTokenizer([chr(97 + i) for i in range(model.config.vocab_size)])
    prompt = tokenizer.decode([1, 2, 3])
    options = SamplingOptions(max_new_tokens=60, seed=5)
    whole = "".join(stream_text(model, tokenizer, prompt, options))
    stop = whole[20:23]  # three characters the sample holds: it ends just before their first occurrence
    pieces = list(stream_text(model, tokenizer, prompt, options, stop=[stop]))
    assert "".join(pieces) == whole[: whole.find(stop)]
    assert all(stop not in piece for piece in pieces)
    # text that only begins a stop string is held back, then shown once it is known not to be one
    almost = next(whole[30:32] + c for c in tokenizer.vocab if whole[30:32] + c not in whole)
    assert "".join(stream_text(model, tokenizer, prompt, options, stop=[almost])) == whole


def ended(texts) -> tuple[str, StreamEnd]:
    """The text a stream yields and how it ended (its return value)."""
    pieces = []
    while True:
        try:
            pieces.append(next(texts))
        except StopIteration as end:
            return "".join(pieces), end.value


def test_stream_text_says_how_it_ended_and_how_many_tokens_it_read_and_sampled(model):
    from gpt_lightning.tokenizer import CharTokenizer

    tokenizer = CharTokenizer([chr(97 + i) for i in range(model.config.vocab_size)])
    prompt = tokenizer.decode([1, 2, 3])
    options = SamplingOptions(max_new_tokens=40, seed=5)
    whole, end = ended(stream_text(model, tokenizer, prompt, options))
    assert end == StreamEnd("length", prompt_tokens=3, tokens=40)
    stop = whole[20:23]
    cut, end = ended(stream_text(model, tokenizer, prompt, options, stop=[stop]))
    assert cut == whole[: whole.find(stop)] and end == StreamEnd("stop", 3, whole.find(stop) + 3)
    questions = itertools.count(1)
    _, end = ended(stream_text(model, tokenizer, prompt, options, cancelled=lambda: next(questions) > 7))
    assert end == StreamEnd("cancelled", 3, 7)


def test_a_padded_model_never_samples_a_padding_id_even_where_its_rows_would_dominate():
    torch.manual_seed(0)
    padded = GPT(GPTConfig(vocab_size=13, padded_vocab_size=64, block_size=12, n_layer=1, n_head=2, n_embd=16,
                           tie_embeddings=False)).eval()  # fmt: skip
    with torch.no_grad():
        padded.lm_head.weight[13:] = 1e4 * padded.lm_head.weight[13:].sign()  # huge logits, were they computed
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for options in ({"temperature": 1.0}, {"temperature": 2.0, "top_k": 50}, {"temperature": 0.0}):
        new = generate(padded, idx, 30, generator=torch.Generator().manual_seed(1), **options)[:, 3:]
        assert int(new.max()) < 13
    assert sample_next(padded(idx)[:, -1], 1.0, generator=torch.Generator().manual_seed(0)).max() < 13
