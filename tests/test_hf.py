"""Weights out: any checkpoint becomes a Hugging Face GPT-2 folder that `transformers` loads with the same
logits, and whose vocabulary maps text to ids without our code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt_lightning.checkpoint import load_model
from gpt_lightning.generate import generate_tokens
from gpt_lightning.hf import gpt_from_hf_gpt2, hf_gpt2_config, hf_gpt2_state_dict
from gpt_lightning.model import GPT, GPTConfig
from tests.conftest import assert_clean_error, assert_ok, cli


@pytest.fixture(scope="module")
def transformers():
    """Imported only where these tests run: it takes seconds."""
    return pytest.importorskip("transformers", reason="the dev extra installs transformers for these tests")


@pytest.fixture
def exported(pretrained: Path, tmp_path: Path) -> Path:
    result = cli("export", f"--ckpt_path={pretrained / 'checkpoints' / 'last.ckpt'}", f"--output={tmp_path / 'hf'}",
                 in_process=True)  # fmt: skip
    assert_ok(result)
    assert "GPT2LMHeadModel.from_pretrained" in result.stdout
    return tmp_path / "hf"


@pytest.mark.slow  # the `pretrained` fixture is a subprocess fit
def test_transformers_loads_the_export_with_our_logits(pretrained: Path, exported: Path, transformers):
    ours, tokenizer = load_model(pretrained / "checkpoints" / "last.ckpt")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    vocab = json.loads((exported / "vocab.json").read_text(encoding="utf-8"))
    text = "KING ARTHUR:\nGood lord, my king"  # 31 characters: within the 32 positions
    ids = torch.tensor([[vocab[c] for c in text]])  # the folder alone maps text to ids
    assert ids.tolist() == tokenizer.encode(text)[None].tolist()
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)
    # Greedy decoding agrees token for token (within the context: Hugging Face's generate does not crop it).
    prompt = ids[:, :12]
    new = torch.cat(list(generate_tokens(ours, prompt, 20, temperature=0.0))).flatten()
    hf = theirs.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, prompt.shape[1] :]
    assert new.tolist() == hf.tolist()


def test_a_model_with_biases_exports_them_and_the_head_stays_tied(tmp_path: Path, transformers):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8, bias=True)).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("bias"):
                param.normal_()  # not the zeros a model without biases exports
    state = hf_gpt2_state_dict(ours)
    assert "lm_head.weight" not in state and state["transformer.h.1.mlp.c_fc.weight"].shape == (8, 32)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_gpt2_config(ours.config))).eval()
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the token embedding
    theirs.tie_weights()
    ids = torch.randint(11, (2, 16))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_export_never_overwrites_a_folder(pretrained: Path, tmp_path: Path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = cli("export", f"--ckpt_path={pretrained / 'checkpoints' / 'last.ckpt'}", f"--output={taken}",
                 in_process=True)  # fmt: skip
    assert_clean_error(result, "taken exists and is not an empty folder: export into a new folder")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


# -- weights in ---------------------------------------------------------------------------------------


@pytest.fixture
def hf_gpt2(tmp_path: Path, transformers) -> tuple[object, Path]:
    """A random GPT-2 as transformers builds and saves one: tanh GELU ("gelu_new"), biases, 16 positions."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt2")
    return model, tmp_path / "gpt2"


def test_a_hugging_face_gpt2_loads_with_its_logits_and_greedy_tokens(hf_gpt2):
    theirs, folder = hf_gpt2
    ours = gpt_from_hf_gpt2(folder)
    assert ours.config.gelu == "tanh" and ours.config.bias and ours.config.block_size == 16
    ids = torch.randint(50, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[:1, :6]
    new = torch.cat(list(generate_tokens(ours, prompt, 10, temperature=0.0))).flatten()
    hf = theirs.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 6:]
    assert new.tolist() == hf.tolist()


def test_block_size_crops_the_position_table_and_never_extends_it(hf_gpt2):
    theirs, folder = hf_gpt2
    ours = gpt_from_hf_gpt2(folder, block_size=8)
    assert ours.wpe.weight.shape == (8, 32)
    ids = torch.randint(50, (1, 8))
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="block_size 32 exceeds the 16 positions .* use 16 or less"):
        gpt_from_hf_gpt2(folder, block_size=32)


@pytest.mark.slow  # the `pretrained` fixture is a subprocess fit
def test_our_checkpoint_exported_and_loaded_back_keeps_its_logits(pretrained: Path, exported: Path):
    ours, tokenizer = load_model(pretrained / "checkpoints" / "last.ckpt")
    back = gpt_from_hf_gpt2(exported)
    ids = tokenizer.encode("KING ARTHUR:\nGood lord")[None]
    with torch.no_grad():
        assert torch.allclose(back(ids), ours(ids), atol=1e-6, rtol=0)


def test_folders_that_are_not_gpt2_are_clear_errors(hf_gpt2, tmp_path: Path):
    _, folder = hf_gpt2
    with pytest.raises(FileNotFoundError, match="not a Hugging Face GPT-2 folder: it needs config.json"):
        gpt_from_hf_gpt2(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="holds a 'llama' model, not GPT-2"):
        gpt_from_hf_gpt2(folder)
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(ValueError, match="does not hold the GPT-2 weights config.json describes"):
        gpt_from_hf_gpt2(folder)
