import math

import pytest
import torch
import torch.nn.functional as F

from gpt_lightning.model import GPT, PRESETS, GPTConfig

TINY = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16)


def test_forward_returns_logits_for_every_position():
    model = GPT(TINY)
    idx = torch.randint(TINY.vocab_size, (3, 7))
    assert model(idx).shape == (3, 7, TINY.vocab_size)


def test_causal_changing_a_future_token_leaves_past_logits_unchanged():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(TINY.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % TINY.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_initial_loss_is_close_to_uniform_guess():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    idx, targets = torch.randint(65, (8, 32)), torch.randint(65, (8, 32))
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(65)) < 0.1


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(TINY.vocab_size, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cpu", 804_096),  # 4 x 196,608 block matmuls + LayerNorms + 65x128 + 64x128 embeddings
        ("baby-gpt", 10_745_088),  # nanoGPT's "10.65M" excludes the 98,304 position embeddings
        ("gpt2-small", 85_892_352),  # GPT-2's 124,439,808 less 50,192 x 768 token embeddings
    ],
)
def test_preset_parameter_counts(name, expected):
    with torch.device("meta"):
        model = GPT(PRESETS[name])
    assert model.num_parameters() == expected


def test_gpt2_small_with_gpt2_vocabulary_has_gpt2_parameter_count():
    from dataclasses import replace

    with torch.device("meta"):
        model = GPT(replace(PRESETS["gpt2-small"], vocab_size=50257))
    assert model.num_parameters() == 124_439_808


def test_head_is_tied_to_token_embedding():
    model = GPT(TINY)
    assert model.lm_head.weight is model.wte.weight


def test_residual_projections_are_scaled_down():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4))
    std = model.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_embd": 100, "n_head": 3}, "divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"block_size": -1}, "block_size must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"gelu": "relu"}, r"gelu must be exact or tanh"),
    ],
)
def test_invalid_shapes_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_sequence_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="crop the context"):
        GPT(TINY)(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_parameter_groups_cover_every_parameter_exactly_once():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=True))
    decay, no_decay = model.parameter_groups(weight_decay=0.1)
    ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_flops_per_token_matches_a_hand_count():
    c = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    # matmul weights per block: qkv 128x384, proj 128x128, MLP 2 x 128x512; LayerNorm gains 2 x 128
    per_block = 128 * 384 + 128 * 128 + 2 * 128 * 512 + 2 * 128
    n = 4 * per_block + 128 + 65 * 128  # final LayerNorm, tied embedding/head; positions excluded
    attention = 12 * 4 * 128 * 64  # QK^T and AV: 2 matmuls x 2 FLOPs x 3 (fwd + bwd) per layer
    assert GPT(c).flops_per_token() == 6 * n + attention == 4_775_424 + 393_216


def test_kv_cache_gives_the_same_logits_as_a_full_forward():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(TINY.vocab_size, (2, 10))
    full = model(idx)
    caches = model.new_kv_caches(2)
    prefix = model(idx[:, :6], caches, pos=0)
    steps = [model(idx[:, t : t + 1], caches, pos=t) for t in range(6, 8)]
    chunk = model(idx[:, 8:], caches, pos=8)  # several tokens after a prefix: the offset mask
    torch.testing.assert_close(torch.cat([prefix, *steps, chunk], dim=1), full, atol=1e-5, rtol=1e-5)


def packed_row(lengths: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Examples of these lengths, alone (1, n) each, and packed into one row: (1, T) tokens and segment ids."""
    examples = [torch.randint(TINY.vocab_size, (1, n)) for n in lengths]
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    return examples, torch.cat(examples, dim=1), segments


def test_a_packed_example_reads_as_it_does_alone_and_no_attention_crosses_into_another():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    examples, packed, segments = packed_row([5, 3, 4])
    logits = model(packed, segments=segments)  # (1, 12, V)
    start = 0
    for example in examples:  # positions restart at each example, and it sees only itself
        n = example.size(1)
        torch.testing.assert_close(logits[:, start : start + n], model(example), atol=1e-5, rtol=1e-5)
        start += n
    changed = packed.clone()
    changed[0, 5:8] = (changed[0, 5:8] + 1) % TINY.vocab_size  # the middle example's tokens
    again = model(changed, segments=segments)
    assert torch.equal(again[:, :5], logits[:, :5]) and torch.equal(again[:, 8:], logits[:, 8:])
    assert not torch.allclose(again[:, 5:8], logits[:, 5:8])
    # the test can fail: without segments the row is one text, whose later examples see the earlier ones
    assert not torch.allclose(model(packed)[:, 5:], logits[:, 5:])
    # one segment per row is the plain causal model
    torch.testing.assert_close(model(packed, segments=torch.zeros_like(segments)), model(packed))
    with pytest.raises(ValueError, match="segments"):
        model(packed[:, :1], model.new_kv_caches(1), pos=0, segments=segments[:, :1])


def test_without_segments_attention_builds_no_mask(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[object, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = GPT(TINY)
    model(torch.randint(TINY.vocab_size, (2, 7)))
    assert calls == [(None, True)] * TINY.n_layer  # the fused causal kernel, as before packing existed
    calls.clear()
    _, packed, segments = packed_row([4, 3])
    model(packed, segments=segments)
    assert all(mask is not None and mask.shape == (1, 1, 7, 7) and not causal for mask, causal in calls)


# -- a padded vocabulary: more rows than tokens, for the GPU's sake, invisible outside ---------------------------


def padded_and_plain(tie_embeddings: bool, rows: int = 64) -> tuple[GPT, GPT]:
    """A GPT of 11 tokens whose embedding (and head) has `rows` rows, and the unpadded GPT of its real rows."""
    from dataclasses import replace

    torch.manual_seed(0)
    plain = GPT(replace(TINY, tie_embeddings=tie_embeddings)).eval()
    padded = GPT(replace(plain.config, padded_vocab_size=rows)).eval()
    state = plain.state_dict()
    for name in ("wte.weight", "lm_head.weight"):  # the plain rows, then the padding
        state[name] = torch.cat([state[name], padded.state_dict()[name][len(state[name]) :]])
    padded.load_state_dict(state)
    return padded, plain


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_a_padded_gpt_gives_the_logits_of_its_tokens_only_and_those_of_the_unpadded_gpt(tie_embeddings: bool):
    padded, plain = padded_and_plain(tie_embeddings)
    assert padded.wte.weight.shape == (64, 16) and padded.lm_head.weight.shape == (64, 16)
    idx = torch.randint(11, (2, 9))
    with torch.no_grad():
        logits = padded(idx)
        assert logits.shape == (2, 9, 11)
        torch.testing.assert_close(logits, plain(idx), atol=1e-6, rtol=0)
        caches = padded.new_kv_caches(2)
        assert padded(idx[:, :1], caches).shape == (2, 1, 11)  # decoding too


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_padding_rows_get_no_gradient(tie_embeddings: bool):
    padded, _ = padded_and_plain(tie_embeddings)
    idx = torch.randint(11, (2, 9))
    F.cross_entropy(padded(idx).flatten(0, 1), idx.flatten()).backward()
    for weight in (padded.wte.weight, padded.lm_head.weight):
        assert weight.grad is not None and weight.grad[11:].abs().max() == 0 and weight.grad[:11].abs().max() > 0


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_parameter_and_flop_counts_leave_the_padding_out(tie_embeddings: bool):
    padded, plain = padded_and_plain(tie_embeddings)
    assert padded.num_parameters() == plain.num_parameters()
    assert padded.num_parameters(exclude_position_embedding=True) == plain.num_parameters(True)
    assert padded.flops_per_token() == plain.flops_per_token()
    assert padded.padding_parameters() == (64 - 11) * 16 * (1 if tie_embeddings else 2)
    assert plain.padding_parameters() == 0


def test_gpt2_small_padded_as_nanogpt_still_has_gpt2s_parameter_count():
    from dataclasses import replace

    with torch.device("meta"):
        model = GPT(replace(PRESETS["gpt2-small"], vocab_size=50257, padded_vocab_size=50304))
    assert model.num_parameters() == 124_439_808 and model.wte.weight.shape == (50304, 768)


def test_padding_below_the_vocabulary_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"padded_vocab_size \(10\) is less than vocab_size \(11\).*Use 11 or more"):
        GPTConfig(vocab_size=11, padded_vocab_size=10)


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_pad_vocab_adds_or_drops_padding_rows_and_keeps_the_logits(tie_embeddings: bool):
    padded, plain = padded_and_plain(tie_embeddings)
    idx = torch.randint(11, (2, 9))
    with torch.no_grad():
        expected = plain(idx)
        for rows, padded_vocab_size in ((128, 128), (11, None), (64, 64)):
            padded.pad_vocab(rows)
            assert padded.config.padded_vocab_size == padded_vocab_size and padded.wte.num_embeddings == rows
            assert padded.lm_head.weight.shape == (rows, 16)
            assert (padded.lm_head.weight is padded.wte.weight) == tie_embeddings
            torch.testing.assert_close(padded(idx), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_grow_vocab_takes_padding_rows_first_then_grows(tie_embeddings: bool):
    padded, _ = padded_and_plain(tie_embeddings, rows=16)
    mean = padded.wte.weight[:11].mean(0)
    padded.grow_vocab(11, 14)  # 3 new ids: into the padding
    assert padded.config.vocab_size == 14 and padded.config.padded_vocab_size == 16
    assert padded.wte.weight.shape == (16, 16) and padded.lm_head.weight.shape == (16, 16)
    torch.testing.assert_close(padded.wte.weight[11:14], mean.expand(3, 16))
    assert padded(torch.randint(14, (1, 5))).shape == (1, 5, 14)
    padded.grow_vocab(14, 20)  # past the padding: the rows grow, no padding is left
    assert padded.config.vocab_size == 20 and padded.config.padded_vocab_size is None
    assert padded.wte.weight.shape == (20, 16) and padded.lm_head.weight.shape == (20, 16)
    assert (padded.lm_head.weight is padded.wte.weight) == tie_embeddings
