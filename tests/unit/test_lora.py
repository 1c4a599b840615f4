"""LoRA fine-tuning: only the low-rank updates train, the model starts as its base, merged equals unmerged,
and a LoRA run resumes, samples, exports and runs under DDP like any other."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt_lightning.lora import LoRAConfig, LoRALinear, add_lora, merged_state_dict
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sources import load_model
from gpt_lightning.training.module import GPTModule
from tests.conftest import ROOT, assert_clean_error, assert_ok, cli, finetune, text_samples
from tests.e2e.test_resume import EXACT, assert_same_run

CONFIG = GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True)


def lora_gpt(rank: int = 4, targets=("qkv", "attn_proj", "mlp")) -> tuple[GPT, GPT]:
    """A random base and a LoRA copy of it (dropout 0, so outputs compare exactly)."""
    torch.manual_seed(0)
    base = GPT(CONFIG).eval()
    tuned = GPT(CONFIG).eval()
    tuned.load_state_dict(base.state_dict())
    return base, add_lora(tuned, LoRAConfig(rank=rank, dropout=0.0, targets=list(targets)))


def test_only_the_low_rank_updates_train_and_the_optimizer_holds_only_them():
    vocab = "".join(chr(c) for c in range(97, 117))
    module = GPTModule(vocab=vocab, block_size=16, n_layer=2, n_head=2, n_embd=16, lora=LoRAConfig(rank=4))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_a", ".lora_b")) for name in trainable)
    assert {name.split(".")[-2] for name in trainable} == {"c_attn", "c_proj"}  # qkv and attn_proj by default
    assert not any(".mlp." in name for name in trainable)
    module._trainer = SimpleNamespace(max_steps=10, precision_plugin=SimpleNamespace(scaler=None))  # type: ignore[assignment]
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    # 2 blocks x (qkv: 4 x (16 + 48) + attn_proj: 4 x (16 + 16))
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 2 * (4 * 64 + 4 * 32)


def test_mfu_counts_no_weight_gradients_for_the_frozen_weights():
    base, tuned = lora_gpt(rank=4, targets=["qkv"])
    frozen = base.num_parameters(exclude_position_embedding=True)
    adapters = 2 * 4 * (16 + 48)  # two blocks' A (4 x 16) and B (48 x 4)
    attention = 12 * CONFIG.n_layer * CONFIG.n_embd * CONFIG.block_size
    assert base.flops_per_token() == 6 * frozen + attention
    assert tuned.flops_per_token() == 4 * frozen + 6 * adapters + attention


def test_at_step_0_the_output_is_exactly_the_base_models():
    base, tuned = lora_gpt()
    assert sum(isinstance(m, LoRALinear) for m in tuned.modules()) == 2 * 4
    ids = torch.randint(20, (2, 16))
    with torch.no_grad():
        assert torch.equal(tuned(ids), base(ids))  # B = 0: not close, equal


def test_merged_equals_unmerged_and_keeps_the_plain_names():
    base, tuned = lora_gpt()
    with torch.no_grad():
        for module in tuned.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.5)  # a trained update, not B = 0
    ids = torch.randint(20, (2, 16))
    with torch.no_grad():
        unmerged = tuned(ids)
        assert not torch.allclose(unmerged, base(ids), atol=1e-3)
        merged = merged_state_dict(tuned.state_dict(), LoRAConfig(rank=4, dropout=0.0))
        assert merged.keys() == base.state_dict().keys()  # a plain GPT's state, under its own names
        plain = GPT(CONFIG).eval()
        plain.load_state_dict(merged)
        assert torch.allclose(plain(ids), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad, message", [({"rank": -1}, "rank must be >= 0"), ({"rank": 4, "targets": ["ffn"]},
                                          "targets must be some of")])  # fmt: skip
def test_bad_lora_settings_are_clear_errors(bad: dict, message: str):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**bad)


def test_lora_with_muon_is_a_clear_error():
    with pytest.raises(ValueError, match="LoRA trains its low-rank updates with AdamW"):
        GPTModule(vocab="abc", block_size=8, n_layer=1, n_head=1, n_embd=8, optimizer="muon", lora=LoRAConfig(rank=2))


# -- end to end: the fine-tune of the issue, on a tiny pre-trained checkpoint ------------------------------


@pytest.mark.slow
def test_a_lora_fine_tune_fits_resumes_bit_exactly_samples_and_exports(pretrained: Path, text_file: Path,
                                                                      tmp_path: Path, caplog):  # fmt: skip
    caplog.set_level(logging.INFO)
    start = f"--model.init_from={pretrained / 'checkpoints' / 'last.ckpt'}"
    exact = [*EXACT, "--trainer.log_every_n_steps=1", "--sample.max_new_tokens=20"]
    first = finetune(pretrained, text_file, tmp_path / "a", start, *exact, "--trainer.max_steps=12")
    assert_ok(first)
    assert (
        "LoRA rank 8 on qkv, attn_proj: 3,072 trainable parameters; the base model's 27,360 are frozen" in caplog.text
    )
    assert_ok(finetune(pretrained, text_file, tmp_path / "b", start, *exact, "--trainer.max_steps=7"))
    assert_ok(finetune(pretrained, text_file, tmp_path / "b", "--model.init_from=null", "--ckpt_path=last",
                       *exact, "--trainer.max_steps=12"))  # fmt: skip
    straight = tmp_path / "a" / "finetune" / "version_0"
    assert_same_run(straight, tmp_path / "b" / "finetune" / "version_0", 12)
    assert text_samples(straight)  # sampled during training

    ckpt = straight / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["gpt_lightning"]["lora"]["rank"] == 8
    frozen = {k: v for k, v in saved["state_dict"].items() if "lora" not in k}
    base = torch.load(pretrained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, base[k]) for k, v in frozen.items())  # the base never moved

    sample = cli("generate", f"--ckpt_path={ckpt}", "--max_new_tokens=30", "--seed=4", in_process=True)
    assert_ok(sample)
    assert_ok(cli("export", f"--ckpt_path={ckpt}", f"--output={tmp_path / 'merged.ckpt'}", in_process=True))
    merged = cli("generate", f"--ckpt_path={tmp_path / 'merged.ckpt'}", "--max_new_tokens=30", "--seed=4",
                 in_process=True)  # fmt: skip
    assert merged.stdout == sample.stdout  # the merged checkpoint samples the same text
    lora_model, tokenizer = load_model(ckpt)
    plain, _ = load_model(tmp_path / "merged.ckpt")
    ids = tokenizer.encode("KING ARTHUR:\nGood lord")[None]
    with torch.no_grad():
        assert torch.allclose(plain(ids), lora_model(ids), atol=1e-5, rtol=0)

    # A LoRA checkpoint as the start of another fine-tune is merged first: it starts from the same logits.
    again = GPTModule(vocab=tokenizer.vocab, block_size=32, init_from=str(ckpt), lora=LoRAConfig(rank=4)).gpt.eval()
    with torch.no_grad():
        assert torch.allclose(again(ids), lora_model(ids), atol=1e-5, rtol=0)
    # validate takes the checkpoint's LoRA layers as it takes its architecture.
    configs = ["--config", str(ROOT / "configs/finetune.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml")]
    validated = cli("validate", *configs, f"--data.path={text_file}", "--data.speakers=null",
                    f"--data.cache_dir={tmp_path}/a/token_cache", f"--ckpt_path={ckpt}", "--model.init_from=null",
                    "--trainer.logger=false", in_process=True)  # fmt: skip
    assert_ok(validated)
    assert "val/loss" in validated.stdout
    # And to a Hugging Face folder, merged.
    assert_ok(cli("export", f"--ckpt_path={ckpt}", f"--output={tmp_path / 'hf'}", in_process=True))
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_lora_fine_tune_under_bf16_mixed(pretrained: Path, text_file: Path, tmp_path: Path):
    start = f"--model.init_from={pretrained / 'checkpoints' / 'last.ckpt'}"
    result = finetune(pretrained, text_file, tmp_path, start, "--trainer.precision=bf16-mixed", "--trainer.max_steps=4",
                      "--trainer.val_check_interval=2", "--sample.max_new_tokens=10")  # fmt: skip
    assert_ok(result)


@pytest.mark.slow
def test_a_lora_fine_tune_under_ddp_on_cpu(pretrained: Path, text_file: Path, tmp_path: Path):
    # DDP registers only parameters that need gradients: the frozen base needs no find_unused_parameters.
    probe = tmp_path / "probe"
    start = f"--model.init_from={pretrained / 'checkpoints' / 'last.ckpt'}"
    result = finetune(pretrained, text_file, tmp_path / "runs", start,
                      "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), "--trainer.max_steps=4",
                      "--trainer.val_check_interval=2", "--sample.max_new_tokens=10",
                      "--trainer.callbacks+=tests.probe.RecordRank", f"--trainer.callbacks.out_dir={probe}",
                      in_process=False)  # fmt: skip
    assert_ok(result)
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["batches"] != ranks[1]["batches"]


@pytest.mark.slow
def test_exporting_a_merged_checkpoint_never_overwrites(pretrained: Path, tmp_path: Path):
    taken = tmp_path / "taken.ckpt"
    taken.write_text("mine")
    result = cli("export", f"--ckpt_path={pretrained / 'checkpoints' / 'last.ckpt'}", f"--output={taken}",
                 in_process=True)  # fmt: skip
    assert_clean_error(result, "taken.ckpt exists: export into a new file")
    assert taken.read_text() == "mine"
