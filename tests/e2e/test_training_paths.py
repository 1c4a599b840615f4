"""In-process checks of the training paths that cluster users take: schedules that survive resumes and
extensions, accumulation with dropout, the logging cadence, mixed precision and torch.compile."""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from gpt_lightning.commands import generate
from gpt_lightning.commands.device import DeviceAndPrecision
from gpt_lightning.optim import WarmupCosine
from gpt_lightning.sampling import generate_tokens
from gpt_lightning.sources import load_model
from gpt_lightning.training.callbacks import TokenThroughput
from gpt_lightning.training.datamodule import TextDataModule
from gpt_lightning.training.module import GPTModule
from gpt_lightning.training.nan_guard import is_logging_step


def data_and_module(text_file: Path, **module_kwargs) -> tuple[TextDataModule, GPTModule]:
    data = TextDataModule(
        path=str(text_file), cache_dir=str(text_file.parent / "token_cache"), block_size=16, batch_size=4
    )
    module = GPTModule(vocab=data.vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, warmup_steps=2,
                       **module_kwargs)  # fmt: skip
    return data, module


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, accelerator="cpu", devices=1)  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


# -- the learning-rate schedule ---------------------------------------------------------------------


def test_restretching_the_schedule_continues_from_the_lr_reached():
    schedule = WarmupCosine(warmup_steps=10, decay_steps=100, min_ratio=0.1)
    before = [schedule(s) for s in range(61)]
    schedule.restretch(60, decay_steps=300)
    after = [schedule(s) for s in range(60, 320)]
    assert after[0] == pytest.approx(before[60])  # no jump at the restretch
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # still decays, never rises
    assert after[300 - 60] == after[-1] == pytest.approx(0.1)  # reaches min_ratio at the new horizon
    assert after[100 - 60] > 0.1 + 1e-3  # and not at the old one


def test_the_schedule_travels_in_the_scheduler_state():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(warmup_steps=2, decay_steps=20, min_ratio=0.1)
    schedule.restretch(5, decay_steps=50)
    state = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule).state_dict()
    fresh = WarmupCosine(warmup_steps=2, decay_steps=999, min_ratio=0.1)
    torch.optim.lr_scheduler.LambdaLR(optimizer, fresh).load_state_dict(state)
    assert fresh == schedule


def test_resuming_with_new_max_steps_keeps_the_checkpoints_horizon(tmp_path: Path, text_file: Path):
    data, module = data_and_module(text_file)
    trainer(tmp_path, max_steps=8).fit(module, datamodule=data)
    ckpt = tmp_path / "at8.ckpt"
    module.trainer.save_checkpoint(ckpt)
    data, module = data_and_module(text_file)
    resumed = trainer(tmp_path, max_steps=12)
    resumed.fit(module, datamodule=data, ckpt_path=ckpt)
    assert module.lr_schedulers().lr_lambdas[0].decay_steps == 8
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(module.optim.min_lr)  # flat past the horizon


def test_an_explicit_decay_horizon_on_resume_restretches_without_a_jump(tmp_path: Path, text_file: Path):
    data, module = data_and_module(text_file, lr_decay_steps=16)
    first = trainer(tmp_path, max_steps=8)
    first.fit(module, datamodule=data)
    lr_at_8 = first.optimizers[0].param_groups[0]["lr"]  # the LR of step 8, set after step 7
    ckpt = tmp_path / "at8.ckpt"
    first.save_checkpoint(ckpt)
    data, module = data_and_module(text_file, lr_decay_steps=40)
    lrs = []

    class RecordLR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(tmp_path, max_steps=40, callbacks=[RecordLR()]).fit(module, datamodule=data, ckpt_path=ckpt)
    assert lrs[0] == pytest.approx(lr_at_8)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    min_lr = module.optim.min_lr
    assert lrs[-1] > min_lr and module.lr_schedulers().get_last_lr()[0] == pytest.approx(min_lr)


# -- accumulation, dropout and the logging cadence ----------------------------------------------------


class RecordDropoutRNG(Callback):
    """The RNG state each forward pass starts from: equal states draw equal dropout masks."""

    def __init__(self) -> None:
        self.states: list[str] = []

    def on_fit_start(self, trainer, pl_module):
        pl_module.gpt.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        if module.training:
            self.states.append(hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest())


def test_every_micro_batch_of_an_accumulation_window_draws_its_own_dropout(tmp_path: Path, text_file: Path):
    data, module = data_and_module(text_file, dropout=0.1)
    record = RecordDropoutRNG()
    trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[record]).fit(module, datamodule=data)
    assert len(record.states) == 6 and len(set(record.states)) == 6


def test_logging_cadence_matches_lightning_and_zero_never_logs():
    def every(n: int) -> SimpleNamespace:
        return SimpleNamespace(log_every_n_steps=n)

    assert [s for s in range(12) if is_logging_step(every(5), s)] == [4, 9]
    assert [s for s in range(4) if is_logging_step(every(1), s)] == [0, 1, 2, 3]
    assert not any(is_logging_step(every(0), s) for s in range(10))


# -- mixed precision ----------------------------------------------------------------------------------


def test_no_fused_adamw_while_a_grad_scaler_is_active(monkeypatch: pytest.MonkeyPatch):
    # Fused AdamW unscales internally, so Lightning would clip still-scaled fp16 gradients. Pretend to be
    # on CUDA, where fused is otherwise chosen, and record what AdamW is asked for.
    asked = []
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kwargs: asked.append(kwargs["fused"]) or
                        torch.optim.SGD(params, lr=kwargs["lr"]))  # fmt: skip
    module = GPTModule(vocab="abc", block_size=8, n_layer=1, n_head=1, n_embd=8)
    module._device = torch.device("cuda", 0)
    for scaler in (torch.amp.GradScaler("cpu"), None):
        module._trainer = SimpleNamespace(max_steps=10, precision_plugin=SimpleNamespace(scaler=scaler))  # type: ignore[assignment]
        module.configure_optimizers()
    assert asked == [False, True]


def test_value_clipping_under_bf16_mixed_keeps_a_fused_adamw(tmp_path: Path, text_file: Path, monkeypatch):
    # On CUDA without a GradScaler AdamW is fused, and Lightning's mixed-precision plugin refuses to clip
    # for a fused optimizer. Fused AdamW runs on CPU too: force it here.
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kwargs: adamw(params, **{**kwargs, "fused": True}))
    data = TextDataModule(path=str(text_file), cache_dir=str(tmp_path), block_size=16, batch_size=4)
    module = GPTModule(vocab=data.vocab, block_size=16, n_layer=1, n_head=1, n_embd=16)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, gradient_clip_val=1e-3,
                        gradient_clip_algorithm="value", limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.optimizers[0].defaults["fused"] is True and trainer.global_step == 2


def test_bf16_mixed_on_cpu_fits_resumes_and_samples_the_same_with_and_without_the_cache(
    tmp_path: Path, text_file: Path
):
    data, module = data_and_module(text_file)
    trainer(tmp_path, max_steps=4, precision="bf16-mixed", gradient_clip_val=1.0).fit(module, datamodule=data)
    ckpt = tmp_path / "bf16.ckpt"
    module.trainer.save_checkpoint(ckpt)
    data, resumed = data_and_module(text_file)
    trainer(tmp_path, max_steps=6, precision="bf16-mixed").fit(resumed, datamodule=data, ckpt_path=ckpt)
    assert resumed.global_step == 6
    assert all(torch.isfinite(p).all() for p in resumed.parameters())
    gpt = resumed.gpt.eval()
    idx = data.tokenizer.encode("KING ARTHUR:")[None]
    samples = []
    for use_kv_cache in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            generator = torch.Generator().manual_seed(0)
            tokens = generate_tokens(gpt, idx, 40, 0.8, generator=generator, use_kv_cache=use_kv_cache)
            samples.append(torch.cat(list(tokens)))
    assert torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("precision,dtype,autocast", [("bf16-true", torch.bfloat16, False),
                                                      ("bf16-mixed", torch.float32, True)])  # fmt: skip
def test_generate_honours_the_trainer_precision(tmp_path, text_file, monkeypatch, capsys, precision, dtype, autocast):
    data, module = data_and_module(text_file)
    trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    ckpt = tmp_path / "model.ckpt"
    module.trainer.save_checkpoint(ckpt)
    seen = {}

    def spy(model, idx, *args, **kwargs):
        seen["dtype"], seen["autocast"] = model.lm_head.weight.dtype, torch.is_autocast_enabled("cpu")
        yield from ()  # a generator, as generate_tokens is: stream_text closes it when it stops early

    # The sampler stream_text runs (the package's `generate` name is the function, so the module by import).
    monkeypatch.setattr(importlib.import_module("gpt_lightning.sampling"), "generate_tokens", spy)
    generate(str(ckpt), prompt="KING", trainer=DeviceAndPrecision(accelerator="cpu", precision=precision))
    assert seen == {"dtype": dtype, "autocast": autocast}


# -- torch.compile ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_fit_trains_and_its_checkpoints_resume_either_way(tmp_path: Path, text_file: Path, caplog):
    data, compiled = data_and_module(text_file, compile=True)
    assert compiled.compiled is not None
    calls = []
    compiled_forward = compiled.compiled
    compiled.compiled = lambda *args, **kwargs: calls.append(1) or compiled_forward(*args, **kwargs)
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, max_steps=2, callbacks=[TokenThroughput()]).fit(compiled, datamodule=data)  # inductor
    assert len(calls) == 2, "the training steps did not run the compiled forward"
    assert compiled.gpt._compiled_call_impl is None  # sampling runs the plain network: each token a new shape
    assert re.search(r"torch\.compile: compiled in \d+\.\d s", caplog.text), caplog.text
    compiled_ckpt = tmp_path / "compiled.ckpt"
    compiled.trainer.save_checkpoint(compiled_ckpt)
    gpt, _ = load_model(compiled_ckpt)  # the plain model loads it: the keys carry no `_orig_mod.`
    data, plain = data_and_module(text_file)
    assert plain.state_dict().keys() == compiled.state_dict().keys()
    trainer(tmp_path, max_steps=3).fit(plain, datamodule=data, ckpt_path=compiled_ckpt)
    plain_ckpt = tmp_path / "plain.ckpt"
    plain.trainer.save_checkpoint(plain_ckpt)
    data, compiled_again = data_and_module(text_file, compile=True)
    trainer(tmp_path, max_steps=4).fit(compiled_again, datamodule=data, ckpt_path=plain_ckpt)
    assert compiled_again.global_step == 4
    assert all(torch.isfinite(p).all() for p in compiled_again.parameters())


def test_validate_then_fit_in_one_process(tmp_path: Path, text_file: Path):
    # A zero-shot score before fine-tuning: validate, then fit with validations, on one Trainer.
    data, module = data_and_module(text_file)
    t = trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=2)
    (before,) = t.validate(module, datamodule=data, verbose=False)
    t.fit(module, datamodule=data)
    assert t.global_step == 4 and float(t.callback_metrics["val/loss"]) < before["val/loss"]


def test_the_h200_has_a_peak_for_mfu(monkeypatch: pytest.MonkeyPatch):
    # Lightning 2.6.6 has no entry for the name CUDA gives the H200 SXM ("NVIDIA H200"): no train/mfu there.
    from gpt_lightning.training import callbacks

    monkeypatch.setattr(callbacks, "get_available_flops", lambda device, dtype: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert callbacks.peak_flops(torch.device("cuda", 0), torch.bfloat16) == 989.4e12
    assert callbacks.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert callbacks.peak_flops(torch.device("cuda", 0), torch.bfloat16) is None
