"""What only a GPU can show: mixed precision with unscaled clipping, fused AdamW, TF32, a compiled fit,
sampling under autocast, DDP on every visible GPU and MFU. Deselected by default (`-m gpu` runs them)
and skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gpt_lightning.lora import LoRAConfig, add_lora
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.optim import CombinedOptimizer
from gpt_lightning.sampling import generate_tokens
from gpt_lightning.sources import load_model
from gpt_lightning.training.callbacks import TokenThroughput
from gpt_lightning.training.datamodule import TextDataModule
from gpt_lightning.training.module import GPTModule
from tests.conftest import ROOT, assert_ok, cli, scalars, tiny_fit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def fit(tmp_path: Path, text_file: Path, precision: str, steps: int = 4, clip: str = "norm",
        **module_kwargs) -> tuple[GPTModule, Path]:  # fmt: skip
    torch.manual_seed(0)
    data = TextDataModule(
        path=str(text_file), cache_dir=str(text_file.parent / "token_cache"), block_size=64, batch_size=16
    )
    module = GPTModule(vocab=data.vocab, block_size=64, n_layer=2, n_head=2, n_embd=64, **module_kwargs)
    logger = TensorBoardLogger(tmp_path, name=precision, default_hp_metric=False)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=steps, log_every_n_steps=1,
                        gradient_clip_val=1.0, gradient_clip_algorithm=clip, logger=logger,
                        callbacks=[TokenThroughput()], limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, Path(logger.log_dir)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_clips_and_logs_unscaled_gradients(tmp_path: Path, text_file: Path, precision, optimizer):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    module, run = fit(tmp_path, text_file, precision, optimizer=optimizer)
    _, reference = fit(tmp_path, text_file, "32-true", optimizer=optimizer)
    norm, reference_norm = scalars(run)["train/grad_norm"][0][1], scalars(reference)["train/grad_norm"][0][1]
    assert 0.5 < norm / reference_norm < 2.0  # a loss-scaled norm would be thousands of times larger
    optimizer = module.trainer.optimizers[0]
    adamw = optimizer.optimizers[-1] if isinstance(optimizer, CombinedOptimizer) else optimizer
    fused = adamw.defaults["fused"]
    assert bool(fused) is (precision != "16-mixed")  # fused AdamW would skip Lightning's unscale_


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_value_clipping_under_mixed_precision(tmp_path: Path, text_file: Path, precision: str):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    module, run = fit(tmp_path, text_file, precision, clip="value")  # bf16-mixed keeps a fused AdamW
    assert module.trainer.global_step == 4 and scalars(run)["train/grad_norm"]


def test_tf32_on_ampere_and_train_mfu_between_0_and_1(tmp_path: Path, text_file: Path):
    _, run = fit(tmp_path, text_file, "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed", steps=8)
    if torch.cuda.get_device_capability()[0] >= 8:
        assert torch.get_float32_matmul_precision() == "high"
    mfu = [value for _, value in scalars(run)["train/mfu"]]
    assert mfu and all(0.0 < value < 1.0 for value in mfu)


def test_compiled_fit_on_the_gpu(tmp_path: Path, text_file: Path):
    module, run = fit(tmp_path, text_file, "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed",
                      compile=True)  # fmt: skip
    assert module.compiled is not None and module.gpt._compiled_call_impl is None  # sampling stays eager
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in scalars(run)["train/loss"])


@pytest.mark.parametrize("mode", ["true", "reduce-overhead"])
def test_a_compiled_run_resumes_bit_exactly_with_the_plain_networks_keys(text_file: Path, tmp_path: Path, mode: str):
    from tests.e2e.test_resume import EXACT, assert_same_run

    precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    gpu = ["--trainer.accelerator=gpu", f"--trainer.precision={precision}", "--trainer.deterministic=true",
           f"--model.compile={mode}"]  # fmt: skip

    def fit(runs: Path, *args: str):
        return tiny_fit(text_file, runs, *args, *EXACT, *gpu, in_process=True)

    assert_ok(fit(tmp_path / "a", "--trainer.max_steps=12"))
    assert_ok(fit(tmp_path / "b", "--trainer.max_steps=7"))
    assert_ok(fit(tmp_path / "b", "--trainer.max_steps=12", "--ckpt_path=last"))
    assert_same_run(tmp_path / "a" / "run" / "version_0", tmp_path / "b" / "run" / "version_0", 12)
    last = tmp_path / "a" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert not any("_orig_mod" in key for key in torch.load(last, weights_only=True)["state_dict"])
    load_model(last)  # the plain network loads it, strictly


def test_sampling_under_autocast_is_the_same_with_and_without_the_cache(tmp_path: Path, text_file: Path):
    module, _ = fit(tmp_path, text_file, "32-true")
    gpt = module.gpt.eval().cuda()
    idx = module.tokenizer.encode("KING ARTHUR:")[None].cuda()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    samples = []
    for use_kv_cache in (True, False):
        with torch.autocast("cuda", dtype=dtype):
            tokens = generate_tokens(gpt, idx, 100, 0.8, generator=torch.Generator().manual_seed(0),
                                     use_kv_cache=use_kv_cache)  # fmt: skip
            samples.append(torch.cat(list(tokens)).cpu())
    assert torch.equal(samples[0], samples[1])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP needs two GPUs at least: one proves nothing")
def test_ddp_on_every_visible_gpu(text_file: Path, tmp_path: Path):
    world = torch.cuda.device_count()
    probe = tmp_path / "probe"
    result = tiny_fit(text_file, tmp_path / "runs", "--config", str(ROOT / "configs/trainer/ddp.yaml"),
                      "--trainer.max_steps=6", "--trainer.val_check_interval=3",
                      "--trainer.callbacks+=tests.probe.RecordRank", f"--trainer.callbacks.out_dir={probe}",
                      timeout=600)  # fmt: skip
    assert_ok(result)
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(world)]
    assert len({r["weights"] for r in ranks}) == 1
    assert ranks[0]["batches"] != ranks[1]["batches"]


@pytest.mark.slow
def test_fsdp_preset_trains_saves_a_full_checkpoint_and_resumes(text_file: Path, tmp_path: Path):
    # On every visible GPU (one is enough for FSDP to wrap, shard over a world of one, and gather a full file).
    fsdp = ["--config", str(ROOT / "configs/trainer/fsdp.yaml"), "--model.optimizer=adamw"]
    assert_ok(tiny_fit(text_file, tmp_path / "runs", *fsdp, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                       timeout=600))  # fmt: skip
    last = tmp_path / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    gpt, _ = load_model(last)  # one full file that the plain loader reads
    assert gpt.config.n_layer == 2
    assert_ok(tiny_fit(text_file, tmp_path / "runs", *fsdp, "--trainer.max_steps=6", "--ckpt_path=last", timeout=600))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_fine_tuning_openais_gpt2_lowers_the_tempests_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real thing, where a GPU, the corpus and GPT-2's files in the local huggingface_hub cache are all here."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        load_model("gpt2")
    except FileNotFoundError:
        pytest.skip("OpenAI's gpt2 is not in the local huggingface_hub cache, and there is no network here")
    corpus = ROOT.parent / "shared" / "data"
    if not (corpus / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip("needs the corpus in ../shared/data")
    runs = tmp_path / "runs"
    result = cli("fit", "--config", str(ROOT / "configs/finetune_gpt2.yaml"), f"--data.data_dir={corpus}",
                 f"--data.cache_dir={tmp_path / 'cache'}", f"--trainer.logger.init_args.save_dir={runs}",
                 "--trainer.max_steps=200", "--trainer.val_check_interval=20", timeout=600,
                 env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert_ok(result)
    val = [loss for _, loss in scalars(runs / "finetune_gpt2" / "version_0")["val/loss"]]
    assert min(val) < val[0]  # the best checkpoint improves on the first validation


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lora_fits_under_mixed_precision(tmp_path: Path, text_file: Path, precision: str):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    module, run = fit(tmp_path, text_file, precision, lora=LoRAConfig(rank=4))
    assert module.trainer.global_step == 4
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in scalars(run)["train/loss"])
    assert all(p.grad is None for name, p in module.named_parameters() if "lora" not in name)


def peak_of_gpt2_small_steps(batch: int, lora: LoRAConfig | None = None, dropout: float = 0.0) -> int:
    """The real peak (torch.cuda.max_memory_allocated) of two training steps of the GPT-2-small shape, its
    vocabulary padded to 50,304 rows as the GPT-2 recipe pads it, at context 1024: AdamW, bf16 autocast."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = GPTConfig(vocab_size=50_257, padded_vocab_size=50_304, block_size=1024, n_layer=12, n_head=12,
                       n_embd=768, bias=True, dropout=dropout)  # fmt: skip
    model = GPT(config).cuda()
    if lora is not None:
        add_lora(model, lora)
    optimizer = torch.optim.AdamW(model.parameter_groups(0.1), lr=1e-4, fused=True)
    x = torch.randint(50_257, (batch, 1024), device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), x.roll(-1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def test_gpt2_small_peak_memory_full_against_lora():
    """LoRA rank 8 keeps no gradients or AdamW state for the 124M frozen weights."""
    peaks = {"full": peak_of_gpt2_small_steps(1), "lora": peak_of_gpt2_small_steps(1, LoRAConfig(rank=8))}
    print(f"peak GPU memory, GPT-2 small step: full {peaks['full'] / 1e9:.2f} GB, LoRA r8 {peaks['lora'] / 1e9:.2f} GB")
    # Full keeps 124M x (4 weights + 4 gradients + 8 AdamW) bytes; LoRA the weights alone.
    assert peaks["full"] - peaks["lora"] > 124e6 * 10


@pytest.mark.parametrize("preset", ["gpt2_full_24gb", "gpt2_lora_24gb", "gpt2_full_12gb", "gpt2_lora_12gb"])
def test_a_card_presets_micro_batch_peaks_within_its_card(preset: str):
    """The real peak of a card preset's micro-batch (configs/gpu/), which its YAML sizes by a computed table."""
    import yaml

    settings = yaml.safe_load((ROOT / "configs" / "gpu" / f"{preset}.yaml").read_text())
    recipe = yaml.safe_load((ROOT / "configs" / "finetune_gpt2.yaml").read_text())
    batch, context = settings["data"]["batch_size"], settings["data"]["block_size"]
    assert context == 1024
    card_gb = int(preset.removesuffix("gb").rsplit("_", 1)[1])
    lora = LoRAConfig(**settings["model"]["lora"]) if "lora" in settings["model"] else None
    peak = peak_of_gpt2_small_steps(batch, lora, dropout=recipe["model"]["dropout"])
    print(f"{preset}: peak {peak / 1e9:.2f} GB for micro-batches of {batch} x {context} on a {card_gb} GB card")
    assert peak < 0.9 * card_gb * 1e9
