"""Weights out: any checkpoint becomes a Hugging Face GPT-2 folder that `transformers` loads with the same
logits, and whose vocabulary maps text to ids without our code."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gpt_lightning.hf import export_hf_gpt2, gpt2_names, gpt_from_hf_gpt2, hf_gpt2_config, hf_gpt2_state_dict
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sampling import generate_tokens
from gpt_lightning.sources import load_model
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer, StreamDecoder
from tests.conftest import ROOT, assert_clean_error, assert_ok, cli, cli_env, main_py, make_play


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


# -- sampling GPT-2 folders, BPE ----------------------------------------------------------------------


def train_bpe(path: Path, vocab_size: int = 300, text: str | None = None) -> Path:
    """A tiny byte-level BPE (GPT-2's kind) trained on generated ASCII text: other characters fall back
    to their UTF-8 bytes, one token each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([make_play(200) if text is None else text], trainer)
    tokenizer.save(str(path))
    return path


@pytest.fixture
def bpe_gpt2(tmp_path: Path, transformers) -> Path:
    """A GPT-2 folder as the hub serves one: config.json, model.safetensors and its tokenizer.json."""
    folder = tmp_path / "bpe-gpt2"
    folder.mkdir()
    tokenizer = train_bpe(folder / "tokenizer.json")
    vocab_size = json.loads(tokenizer.read_text())["model"]["vocab"].__len__()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_a_utf8_character_split_across_tokens_streams_whole(tmp_path: Path):
    tokenizer = BPETokenizer.from_file(train_bpe(tmp_path / "tokenizer.json"))
    text = "KING ARTHUR: 東京 and Ça va"
    ids = tokenizer.encode(text).tolist()
    assert len(ids) > len(text.split())  # 東 and 京 are three byte tokens each
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # held back while a character was incomplete


@pytest.mark.slow
def test_generate_samples_a_gpt2_folder_with_its_bpe(bpe_gpt2: Path):
    args = ("generate", f"--ckpt_path={bpe_gpt2}", "--prompt=KING ARTHUR:", "--max_new_tokens=30", "--seed=3")
    first, again = cli(*args, in_process=True), cli(*args, in_process=True)
    assert_ok(first)
    assert first.stdout == again.stdout and first.stdout.startswith("KING ARTHUR:")  # the same seed, the same bytes
    gpt, tokenizer = load_model(bpe_gpt2)
    assert isinstance(tokenizer, BPETokenizer)
    prompt = tokenizer.encode("KING ARTHUR:")[None]
    new = torch.cat(list(generate_tokens(gpt, prompt, 30, 0.8, generator=torch.Generator().manual_seed(3))))
    assert first.stdout == "KING ARTHUR:" + tokenizer.decode(new.flatten()) + "\n"


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(hf_gpt2, tmp_path: Path):
    _, folder = hf_gpt2  # 50 tokens
    train_bpe(folder / "tokenizer.json")  # 300 tokens
    with pytest.raises(ValueError, match="tokenizer has 300 tokens, more than the model's 50"):
        load_model(folder)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [["generate", "--ckpt_path=gpt2"], ["fit", "--config", "configs/finetune_gpt2.yaml", "--trainer.accelerator=cpu"],
     ["fit", "--config", "configs/pretrain_cpu.yaml", "--data.tokenizer=gpt2"]],
    ids=["sampling gpt2", "fine-tuning gpt2", "GPT-2's tokenizer"],
)  # fmt: skip
def test_a_hub_name_without_network_or_cache_is_a_one_line_error(tmp_path: Path, command: list[str]):
    env = {**cli_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    command = [str(ROOT / arg) if arg.startswith("configs/") else arg for arg in command]
    result = subprocess.run(main_py(*command), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert_clean_error(result, r"could not get gpt2 from the Hugging Face hub", "HF_HUB_OFFLINE=1")


def test_openais_gpt2_from_the_local_cache_when_it_is_there(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        gpt, tokenizer = load_model("gpt2")
    except FileNotFoundError:
        pytest.skip("OpenAI's gpt2 is not in the local huggingface_hub cache, and there is no network here")
    assert gpt.num_parameters() == 124_439_808 and tokenizer.vocab_size == 50_257


def test_a_non_zero_local_rank_waits_for_local_rank_0s_download(hf_gpt2, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """Local rank 1 never downloads: it polls huggingface_hub's cache until local rank 0's files are there."""
    import threading

    from huggingface_hub import constants

    from gpt_lightning.hub import hf_gpt2_folder

    _, folder = hf_gpt2
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    revision = "0" * 40

    def download_as_local_rank_0() -> None:  # the cache layout huggingface_hub writes: refs and a snapshot
        time.sleep(1.0)
        repo = cache / "models--openai-community--gpt2"
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (snapshot / name).write_bytes((folder / name).read_bytes())
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)

    writer = threading.Thread(target=download_as_local_rank_0)
    writer.start()
    start = time.monotonic()
    found = hf_gpt2_folder("gpt2", files=["config.json", "model.safetensors"], wait_s=30)
    writer.join()
    assert found.name == revision and time.monotonic() - start >= 1.0
    with pytest.raises(FileNotFoundError, match="could not get gpt2-medium from the Hugging Face hub"):
        hf_gpt2_folder("gpt2-medium", wait_s=1)  # nothing comes: it stops at its deadline, with the same error

    # Local rank 0 fails (no network): it records its error, and a waiting rank stops with it at once.
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(FileNotFoundError, match="could not get gpt2-large"):
        hf_gpt2_folder("gpt2-large", wait_s=1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match="could not get gpt2-large from the Hugging Face hub"):
        hf_gpt2_folder("gpt2-large", wait_s=600)
    assert time.monotonic() - start < 30


# -- every field of a GPT-2 config: honoured, irrelevant, or refused ----------------------------------


def test_every_field_of_gpt2config_is_classified(transformers):
    """A field that a later transformers adds is in none of the three: this test fails until it is classified."""
    from gpt_lightning.hf import GPT2_CONFIG_FIELDS, Only

    defaults = transformers.GPT2Config().to_dict()
    assert sorted(set(defaults) - set(GPT2_CONFIG_FIELDS)) == []
    # A field refused unless it has one value takes the value transformers gives it by default.
    only = {field: rule.value for field, rule in GPT2_CONFIG_FIELDS.items() if isinstance(rule, Only)}
    assert {field: defaults[field] for field in only if field in defaults} == {
        f: only[f] for f in only if f in defaults
    }


def tiny_gpt2(transformers, folder: Path, **fields) -> object:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, **fields)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))  # biases, gains and an untied head unlike their init
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    "fields",
    [
        {"tie_word_embeddings": False},
        {"activation_function": "gelu"},
        {"activation_function": "gelu_pytorch_tanh"},
        {"n_inner": 128, "layer_norm_epsilon": 1e-5, "scale_attn_weights": True},
        {"reorder_and_upcast_attn": True, "attn_implementation": "eager"},  # its own fp32 path: the same in fp32
        {"resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.3, "initializer_range": 0.5, "use_cache": False},
    ],
    ids=lambda fields: ",".join(fields),
)
def test_a_gpt2_folder_loads_with_its_logits_whatever_the_honoured_fields(tmp_path: Path, transformers, fields):
    theirs = tiny_gpt2(transformers, tmp_path / "gpt2", **fields)
    ours = gpt_from_hf_gpt2(tmp_path / "gpt2")
    ids = torch.randint(50, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"scale_attn_weights": False}, "scale_attn_weights=false"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
        ({"add_cross_attention": True}, "add_cross_attention=true"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
        ({"n_inner": 64}, "n_inner=64"),
        ({"activation_function": "relu"}, 'activation_function="relu"'),
        ({"pruned_heads": {"0": [1]}}, 'pruned_heads={"0": [1]}'),
        ({"a_field_of_a_later_transformers": 1}, "a_field_of_a_later_transformers=1"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_gpt2_folder_whose_config_changes_the_forward_pass_is_refused_naming_the_field(
    hf_gpt2, fields: dict, named: str
):
    _, folder = hf_gpt2
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(ValueError, match=re.escape(named)) as refused:
        gpt_from_hf_gpt2(folder)
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match=re.escape(named)):
        load_model(folder)  # the way generate, serve and init_from read it


def test_an_untied_head_exports_and_loads_back_with_its_logits(tmp_path: Path, transformers):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8, tie_embeddings=False)
    ours = GPT(config).eval()
    assert ours.lm_head.weight is not ours.wte.weight
    tied = GPT(dataclasses.replace(config, tie_embeddings=True))
    assert ours.num_parameters() == tied.num_parameters() + 11 * 8  # the head counted, once
    export_hf_gpt2(ours, CharTokenizer("abcdefghijk"), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    back = gpt_from_hf_gpt2(tmp_path / "hf")
    ids = torch.randint(11, (2, 16))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)
        assert torch.equal(back(ids), ours(ids)) and not back.config.tie_embeddings


def test_exporting_an_unmerged_lora_model_writes_its_updates(tmp_path: Path, transformers):
    """What load_model returns by default for a LoRA fine-tune: both exports write the weights it computes with."""
    import lightning

    from gpt_lightning.lora import LoRAConfig, add_lora
    from gpt_lightning.sources import METADATA_KEY, export_plain_checkpoint, metadata

    torch.manual_seed(0)
    tokenizer, lora = CharTokenizer("abcdefghijk"), LoRAConfig(rank=2, targets=["qkv", "mlp"])
    config = GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8)
    model = add_lora(GPT(config), lora).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.normal_()  # updates that change the logits
    source = tmp_path / "lora.ckpt"
    state = {f"gpt.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 3, "pytorch-lightning_version": lightning.__version__,
                METADATA_KEY: metadata(config, tokenizer, lora=lora)}, source)  # fmt: skip
    ids = torch.randint(11, (2, 16))
    export_hf_gpt2(model, tokenizer, tmp_path / "hf")
    export_plain_checkpoint(source, model, tmp_path / "plain.ckpt")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    plain, _ = load_model(tmp_path / "plain.ckpt")
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, model(ids), atol=1e-5, rtol=0)
        assert torch.allclose(plain(ids), model(ids), atol=1e-5, rtol=0)


def test_the_hub_failure_marker_is_this_users_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """On a shared machine, the shared temporary folder may hold another user's files where ours would go:
    here a file where a shared folder of markers was. The offline error stays the one-line error."""
    import os
    import tempfile

    from huggingface_hub import constants

    from gpt_lightning.hub import hf_gpt2_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "gpt-lightning").write_text("another user's")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(FileNotFoundError, match="could not get gpt2 from the Hugging Face hub"):
        hf_gpt2_folder("gpt2", wait_s=1)
    [marker] = tmp_path.glob("**/*.failed")
    assert marker.parent.name == f"gpt-lightning-{os.getuid()}"  # a folder of this user's own


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_one_table_names_every_weight_of_ours_and_of_gpt2(tie_embeddings: bool):
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True,
                       tie_embeddings=tie_embeddings)  # fmt: skip
    names = gpt2_names(config)
    ours = set(GPT(config).state_dict()) - ({"lm_head.weight"} if tie_embeddings else set())
    assert {our for our, _, _ in names} == ours
    assert {their for _, their, _ in names} == set(hf_gpt2_state_dict(GPT(config)))
    assert {our for our, _, transposed in names if transposed} == {
        f"h.{i}.{name}.weight" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


@pytest.mark.parametrize("name", ["plain", "chat"])
def test_an_exported_task_fine_tune_carries_its_template_as_a_chat_template(tmp_path: Path, name: str):
    # transformers' tokenizer renders a conversation from the folder alone as generate and serve do.
    import lightning

    transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")
    from gpt_lightning.commands.export import export
    from gpt_lightning.data.instruct import TEMPLATES, render_prompt
    from gpt_lightning.sources import METADATA_KEY, metadata

    tokenizer = BPETokenizer.from_file(train_bpe(tmp_path / "bpe.json"))
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    template = TEMPLATES[name]
    state = {f"gpt.{k}": v for k, v in GPT(config).state_dict().items()}
    torch.save({"state_dict": state, "global_step": 1, "pytorch-lightning_version": lightning.__version__,
                METADATA_KEY: metadata(config, tokenizer, template=template)}, tmp_path / "tuned.ckpt")  # fmt: skip
    export(str(tmp_path / "tuned.ckpt"), str(tmp_path / "hf"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "KING?"},
                    {"role": "assistant", "content": "Ay."}, {"role": "user", "content": "And then"}]  # fmt: skip
    for messages in (conversation, conversation[1:2]):
        rendered = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == render_prompt(template, messages)


# -- a padded vocabulary ------------------------------------------------------------------------------


def test_a_padded_model_exports_only_its_tokens_with_our_logits_and_hf_never_samples_padding(
    tmp_path: Path, transformers
):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, padded_vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=8,
                       tie_embeddings=False)  # fmt: skip
    ours = GPT(config).eval()
    with torch.no_grad():
        ours.lm_head.weight[11:] = 1e4  # would win every draw, were the padding rows computed
    export_hf_gpt2(ours, CharTokenizer("abcdefghijk"), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 11
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert theirs.transformer.wte.weight.shape == (11, 8) and theirs.lm_head.weight.shape == (11, 8)
    ids = torch.randint(11, (2, 16))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)
    torch.manual_seed(1)
    sampled = theirs.generate(ids[:, :4], max_new_tokens=12, do_sample=True, pad_token_id=0)
    assert int(sampled.max()) < 11
    back, _ = load_model(tmp_path / "hf")
    assert back.config.vocab_size == 11 and back.config.padded_vocab_size is None


def old_padded_checkpoint(path: Path, tokenizer: BPETokenizer, rows: int) -> GPT:
    """A checkpoint as runs with `--model.vocab_size` wrote them before GPTConfig.padded_vocab_size: a config
    whose vocab_size is the embedding's rows, more than its tokenizer's tokens. Its padding rows win every draw."""
    from gpt_lightning.sources import METADATA_KEY, MODEL_PREFIX, metadata

    torch.manual_seed(0)
    old = GPT(GPTConfig(vocab_size=rows, block_size=16, n_layer=1, n_head=2, n_embd=8, tie_embeddings=False))
    with torch.no_grad():
        old.lm_head.weight[tokenizer.vocab_size :] = 1e4
    described = metadata(old.config, tokenizer)
    described["model_config"].pop("padded_vocab_size", None)  # a field those checkpoints lack
    state = {MODEL_PREFIX + k: v for k, v in old.state_dict().items()}
    torch.save({"state_dict": state, METADATA_KEY: described, "global_step": 3}, path)
    return old.eval()


def test_an_old_padded_checkpoint_opens_with_its_tokenizers_tokens_and_samples_only_them(tmp_path: Path):
    from gpt_lightning.sources import open_source

    tokenizer = BPETokenizer.from_file(train_bpe(tmp_path / "tokenizer.json"))
    assert tokenizer.vocab_size == 300
    old = old_padded_checkpoint(tmp_path / "old.ckpt", tokenizer, rows=320)
    source = open_source(tmp_path / "old.ckpt")
    assert (source.config.vocab_size, source.config.padded_vocab_size) == (300, 320)
    settings, _ = source.settings_replacing({}, None)
    assert settings["vocab_size"] == 320  # resumed, its embedding keeps its rows: the optimizer state fits them
    gpt, _ = load_model(tmp_path / "old.ckpt")  # its state_dict loads unchanged
    ids = tokenizer.encode("KING ARTHUR:")[None]
    with torch.no_grad():
        assert torch.allclose(gpt(ids), old(ids)[..., :300], atol=1e-6, rtol=0)
    new = torch.cat(list(generate_tokens(gpt, ids, 20, 1.0, generator=torch.Generator().manual_seed(0))))
    assert int(new.max()) < 300
    tokenizer.decode(new.flatten())


def test_a_gpt2_folder_starts_a_fine_tune_with_its_embedding_padded_to_a_multiple_of_64(bpe_gpt2: Path, transformers):
    from gpt_lightning.sources import build_network, open_source

    source = open_source(bpe_gpt2)  # 300 tokens, 300 rows
    theirs = transformers.GPT2LMHeadModel.from_pretrained(bpe_gpt2).eval()
    ids = source.tokenizer.encode("KING ARTHUR:")[None]
    # model.vocab_size, vocab_multiple: rows given win; unset, the folder's 300 rounded up to the multiple
    for rows, multiple, expected in ((320, 1, 320), (384, 64, 384), (None, 1, 300), (None, 64, 320), (None, 128, 384)):
        gpt = build_network(source, source.tokenizer, 64, {"vocab_size": rows, "vocab_multiple": multiple}).eval()
        assert gpt.wte.num_embeddings == expected and gpt.config.vocab_size == 300, (rows, multiple)
        with torch.no_grad():
            assert torch.allclose(gpt(ids), theirs(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="model.vocab_size 299 is less than the tokenizer's 300 tokens"):
        build_network(source, source.tokenizer, 64, {"vocab_size": 299})
    with pytest.raises(ValueError, match=r"model.vocab_multiple must be a positive integer \(64 pads GPT-2's"):
        build_network(source, source.tokenizer, 64, {"vocab_multiple": 0})
    fresh = build_network(None, CharTokenizer("abcdefghijklmnopqrstuvwxyz"), 16, {"vocab_multiple": 64})
    assert (fresh.config.vocab_size, fresh.wte.num_embeddings) == (26, 64)  # a model from scratch, too


def test_a_padded_gpt2_folder_opens_with_its_tokenizers_tokens_and_may_be_padded_otherwise(
    tmp_path: Path, transformers
):
    from gpt_lightning.sources import build_network, open_source

    folder = tmp_path / "gpt2"
    tokenizer = BPETokenizer.from_file(train_bpe(tmp_path / "tokenizer.json"))  # 300 tokens
    torch.manual_seed(0)
    hf = transformers.GPT2Config(vocab_size=320, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    theirs = transformers.GPT2LMHeadModel(hf).eval()
    theirs.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer.tokenizer_json, encoding="utf-8")
    source = open_source(folder)
    assert (source.config.vocab_size, source.config.padded_vocab_size) == (300, 320)
    ids = tokenizer.encode("KING ARTHUR:")[None]
    for rows, padded in ((None, 320), (384, 384), (300, None)):  # the folder's padding, more, none
        gpt = build_network(source, tokenizer, 16, {"vocab_size": rows}).eval()
        assert gpt.config.padded_vocab_size == padded
        with torch.no_grad():
            assert torch.allclose(gpt(ids), theirs(ids).logits[..., :300], atol=1e-5, rtol=0)
