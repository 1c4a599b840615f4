"""The optimizer choice: Muon for the blocks' matrices and AdamW for the rest, stepped as one optimizer
that Lightning drives like any other (schedule, clipping, mixed precision, checkpoints)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.plugins import MixedPrecision

from gpt_lightning.optim import CombinedOptimizer, Muon, native_bf16
from gpt_lightning.training.datamodule import TextDataModule
from gpt_lightning.training.module import GPTModule

VOCAB = "abcdefgh"


def module(optimizer: str, **kwargs) -> GPTModule:
    torch.manual_seed(0)
    m = GPTModule(vocab=VOCAB, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=True, optimizer=optimizer,
                  warmup_steps=2, **kwargs)  # fmt: skip
    m._trainer = SimpleNamespace(max_steps=10, precision_plugin=SimpleNamespace(scaler=None))  # type: ignore[assignment]
    return m


def configured(m: GPTModule) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    config = m.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def train_steps(m: GPTModule, optimizer: torch.optim.Optimizer, scheduler, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(len(VOCAB), (4, 8), generator=generator)
        optimizer.zero_grad()
        m._loss((x, x.roll(-1, dims=1))).backward()
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("choice", ["adamw", "muon"])
def test_every_parameter_is_in_exactly_one_optimizer(choice: str):
    m = module(choice)
    optimizer, _ = configured(m)
    children = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    held = [id(p) for child in children for group in child.param_groups for p in group["params"]]
    assert sorted(held) == sorted(id(p) for p in m.parameters())  # all of them, none twice
    if choice == "muon":
        muon, adamw = children
        assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
        in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
        expected = {id(p) for name, p in m.gpt.named_parameters() if name.startswith("h.") and p.dim() == 2}
        assert in_muon == expected and len(expected) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per block
        decay = {id(p) for p in adamw.param_groups[0]["params"]}
        assert decay == {id(m.gpt.wte.weight), id(m.gpt.wpe.weight)}  # the tied head is wte
        assert all(p.dim() == 1 for p in adamw.param_groups[1]["params"])  # norms and biases, no decay
        assert adamw.param_groups[1]["weight_decay"] == 0.0


def test_one_schedule_drives_both_optimizers():
    m = module("muon", learning_rate=1e-3, min_lr=1e-4, muon_learning_rate=0.02)
    optimizer, scheduler = configured(m)
    lrs = []
    for _ in range(11):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert lrs[0]["muon"] == pytest.approx(0.02 / 3) and lrs[0]["adamw"] == pytest.approx(1e-3 / 3)
    assert lrs[2]["muon"] == pytest.approx(0.02) and lrs[10]["muon"] == pytest.approx(0.002)
    assert all(r["muon"] / r["adamw"] == pytest.approx(20) for r in lrs)
    assert optimizer.optimizers[0].param_groups[0]["lr"] == lrs[-1]["muon"]  # the children's own groups


def test_the_combined_state_round_trips_and_continues_bit_for_bit():
    straight = module("muon")
    optimizer, scheduler = configured(straight)
    train_steps(straight, optimizer, scheduler, 3)
    saved_weights = copy.deepcopy(straight.state_dict())
    saved = copy.deepcopy({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    train_steps(straight, optimizer, scheduler, 3, seed=1)

    resumed = module("muon")
    resumed.load_state_dict(saved_weights)
    optimizer2, scheduler2 = configured(resumed)
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    assert optimizer2.optimizers[0].state  # Muon's momentum buffers came back
    train_steps(resumed, optimizer2, scheduler2, 3, seed=1)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # The scheduler still reaches the children after loading replaced their group dicts.
    assert optimizer2.param_groups[0] is optimizer2.optimizers[0].param_groups[0]


def test_an_adamw_state_does_not_load_into_muon():
    adamw, _ = configured(module("adamw"))
    muon, _ = configured(module("muon"))
    with pytest.raises(ValueError, match="saved with another model.optimizer setting"):
        muon.load_state_dict(adamw.state_dict())


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="model.optimizer must be one of adamw, muon"):
        GPTModule(vocab=VOCAB, block_size=8, optimizer="sgd")  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("muon_precision", ["bf16", "fp32"])
def test_muon_under_mixed_precision_steps_on_unscaled_clipped_gradients(tmp_path: Path, text_file: Path, precision,
                                                                        muon_precision):  # fmt: skip
    # fp16 on a CPU takes a gradient scaler, as on a GPU. The step must see gradients that were unscaled,
    # then clipped to 0.5: clipping scaled ones would leave them ~65536 times too large, or clip too hard.
    plugin = MixedPrecision(precision, "cpu", torch.amp.GradScaler("cpu") if precision == "16-mixed" else None)
    data = TextDataModule(path=str(text_file), cache_dir=str(tmp_path), block_size=16, batch_size=4)
    m = GPTModule(vocab=data.vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, optimizer="muon", warmup_steps=1,
                  muon_precision=muon_precision)  # fmt: skip
    norms: list[float] = []

    class RecordNorms(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            muon = trainer.optimizers[0].optimizers[0]  # stepped after Lightning's closure ran backward
            muon.register_step_pre_hook(
                lambda *_: norms.append(torch.nn.utils.clip_grad_norm_(pl_module.parameters(), float("inf")).item())
            )

    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, accelerator="cpu", max_steps=6, plugins=[plugin],
                        gradient_clip_val=0.5, callbacks=[RecordNorms()])  # fmt: skip
    trainer.fit(m, datamodule=data)
    stepped = [n for n in norms if math.isfinite(n)]  # a scaler skips the steps whose gradients overflowed
    assert stepped and all(0.05 < n <= 0.5 + 1e-3 for n in stepped), norms
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_lightning_moves_the_combined_state_with_the_model():
    # After fit, Lightning moves optimizer state off the GPU through `optimizer.state`; the children hold it.
    straight = module("muon")
    optimizer, scheduler = configured(straight)
    train_steps(straight, optimizer, scheduler, 2)
    assert len(optimizer.state) == sum(len(child.state) for child in optimizer.optimizers) > 0
    _optimizer_to_device(optimizer, torch.device("meta"))
    moved = [v for child in optimizer.optimizers for s in child.state.values() for k, v in s.items() if k != "step"]
    assert moved and all(tensor.device.type == "meta" for tensor in moved)


# -- Muon's precision ----------------------------------------------------------------------------------

# The CPU recipe's hidden matrices: attention in (384, 128) and out (128, 128), MLP in (512, 128) and out (128, 512).
SHAPES = [(384, 128), (128, 128), (512, 128), (128, 512)]


def muon_pair(cls_a, cls_b, **kwargs) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter], object, object]:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in SHAPES]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, b, cls_a(a, lr=0.02, weight_decay=0.1, **kwargs), cls_b(b, lr=0.02, weight_decay=0.1)


def step_both(a, b, step_a, step_b, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for pa, pb in zip(a, b, strict=True):
            pa.grad = torch.randn(pa.shape, generator=generator)
            pb.grad = pa.grad.clone()
        step_a()
        step_b()


def test_our_muon_step_in_bf16_is_torchs_bit_for_bit():
    a, b, ours, torchs = muon_pair(Muon, torch.optim.Muon, precision="fp32")
    step_both(a, b, lambda: ours._step(None, torch.bfloat16), torchs.step, steps=5)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b, strict=True))
    assert all(torch.equal(ours.state[pa]["momentum_buffer"], torchs.state[pb]["momentum_buffer"])
               for pa, pb in zip(a, b, strict=True))  # fmt: skip


def test_our_muon_step_in_fp32_stays_close_to_torchs():
    a, b, ours, torchs = muon_pair(Muon, torch.optim.Muon, precision="fp32")
    start = [p.detach().clone() for p in a]
    step_both(a, b, ours.step, torchs.step, steps=5)
    for pa, pb, p0 in zip(a, b, start, strict=True):
        # bfloat16 keeps 8 bits of mantissa: the two updates agree to about 1% of their size.
        assert (pa - pb).norm() < 0.02 * (pb - p0).norm()


@pytest.mark.parametrize("saved_in, loaded_in", [("fp32", "bf16"), ("bf16", "fp32")])
def test_muon_state_moves_between_precisions(saved_in: str, loaded_in: str):
    a, b, first, _ = muon_pair(Muon, torch.optim.Muon, precision=saved_in)
    step_both(a, b, first.step, lambda: None, steps=2)
    second = Muon(a, precision=loaded_in, lr=0.02, weight_decay=0.1)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    assert second.state_dict()["state"].keys() == first.state_dict()["state"].keys()
    assert all(torch.equal(second.state[p]["momentum_buffer"], first.state[p]["momentum_buffer"]) for p in a)
    torch.optim.Muon(a, lr=0.02).load_state_dict(first.state_dict())  # and into torch's own


def test_auto_takes_bf16_only_where_it_is_native(monkeypatch: pytest.MonkeyPatch):
    assert native_bf16(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bf16(torch.device("cpu"))
    assert Muon([torch.nn.Parameter(torch.zeros(2, 2))], precision="auto").resolved_precision() == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bf16(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below its bfloat16 kernels
    assert not native_bf16(torch.device("cpu"))
    with pytest.raises(ValueError, match="muon_precision must be one of auto, bf16, fp32"):
        GPTModule(vocab=VOCAB, block_size=8, optimizer="muon", muon_precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Muon's precision must be one of auto, bf16, fp32, got 'fp16'"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], precision="fp16")  # type: ignore[arg-type]
