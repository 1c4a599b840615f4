"""The LightningModule and DataModule in-process: same logits as the plain model, checkpoints that describe
themselves, the optimizer and its schedule."""

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.loggers import TensorBoardLogger

from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.optim import WarmupCosine
from gpt_lightning.sources import load_model, open_source
from gpt_lightning.training.callbacks import TokenThroughput
from gpt_lightning.training.datamodule import TextDataModule
from gpt_lightning.training.module import GPTModule
from tests.conftest import scalars

VOCAB = "\n !,.:;?ABCDEFGHIKLMNORSTUWYZabcdefghiklmnorstuvwy"


def tiny_module(**kwargs) -> GPTModule:
    return GPTModule(vocab=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16, **kwargs)


def test_module_gives_the_plain_models_logits():
    module = tiny_module().eval()
    plain = GPT(module.config).eval()
    plain.load_state_dict(module.gpt.state_dict())
    idx = torch.randint(len(VOCAB), (2, 16))
    assert torch.equal(module(idx), plain(idx))


@pytest.mark.parametrize("compile", [True, "reduce-overhead", "max-autotune"])
def test_compiled_module_keeps_checkpoint_keys_and_samples_with_the_plain_network(compile):
    module = tiny_module(compile=compile)
    assert module.state_dict().keys() == tiny_module().state_dict().keys()
    assert module.compiled is not None and module.gpt._compiled_call_impl is None


def test_an_unknown_compile_mode_names_the_modes():
    with pytest.raises(ValueError, match=r"model.compile must be true, false or a mode \(reduce-overhead, max-"):
        tiny_module(compile="fast")


def test_schedule_warms_up_then_decays_to_min_lr():
    schedule = WarmupCosine(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    factors = [schedule(s) for s in range(130)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[110] == factors[129] == pytest.approx(0.1)


def test_fit_writes_a_checkpoint_that_is_enough_to_sample(tmp_path: Path, text_file: Path):
    data = TextDataModule(
        path=str(text_file), cache_dir=str(text_file.parent / "token_cache"), block_size=16, batch_size=4
    )
    module = GPTModule(vocab=data.vocab, block_size=data.block_size, n_layer=1, n_head=2, n_embd=16)
    trainer = L.Trainer(max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, val_check_interval=3,
                        check_val_every_n_epoch=None)  # fmt: skip
    trainer.fit(module, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert open_source(path).tokenizer == data.tokenizer
    gpt, tokenizer = load_model(path)
    assert tokenizer.vocab == data.vocab
    idx = torch.randint(tokenizer.vocab_size, (1, 8))
    torch.testing.assert_close(gpt(idx), module.gpt.eval()(idx))
    optimizer = trainer.optimizers[0]
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in module.parameters() if p.dim() >= 2}
    assert math.isclose(optimizer.param_groups[0]["betas"][1], 0.99)


def test_initial_training_loss_is_near_uniform(text_file: Path):
    data = TextDataModule(
        path=str(text_file), cache_dir=str(text_file.parent / "token_cache"), block_size=32, batch_size=16
    )
    data.setup("fit")
    module = GPTModule(vocab=data.vocab, block_size=32, n_layer=2, n_head=2, n_embd=32)
    loss = module._loss(next(iter(data.train_dataloader())))
    assert abs(loss.item() - math.log(len(data.vocab))) < 0.15


def test_datamodule_splits_90_10_and_links_vocab_and_block_size(text_file: Path):
    data = TextDataModule(
        path=str(text_file), cache_dir=str(text_file.parent / "token_cache"), block_size=24, batch_size=4
    )
    data.setup("fit")
    total = data.train_tokens.numel() + data.val_tokens.numel()
    assert total == len(text_file.read_text()) and data.train_tokens.numel() == int(total * 0.9)
    assert data.vocab == "".join(sorted(set(text_file.read_text())))
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (16, 24) and torch.equal(x[0, 1:], y[0, :-1])  # validation batches: 4 x batch_size


def test_step_scalars_share_logging_steps_with_sparse_logging_and_accumulation(tmp_path: Path, text_file: Path):
    data = TextDataModule(
        path=str(text_file), cache_dir=str(text_file.parent / "token_cache"), block_size=16, batch_size=4
    )
    module = GPTModule(vocab=data.vocab, block_size=data.block_size, n_layer=1, n_head=2, n_embd=16)
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = L.Trainer(max_steps=12, accumulate_grad_batches=2, log_every_n_steps=3, logger=logger,
                        callbacks=[TokenThroughput()], limit_val_batches=0,
                        gradient_clip_val=1.0, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    logged = scalars(Path(logger.log_dir))
    expected_steps = [2, 5, 8, 11]  # every third optimizer step, counted from 0; two batches per step
    for tag in ("train/loss", "train/grad_norm", "train/tokens_per_sec"):
        assert [step for step, _ in logged[tag]] == expected_steps, tag
    assert all(value > 0 for _, value in logged["train/tokens_per_sec"])
    assert "train/mfu" not in logged  # no known peak FLOPs for a CPU


def test_training_batches_are_the_same_with_and_without_loader_workers(text_file: Path):
    streams = []
    for workers in (0, 2):  # 0 serves the dataset itself, 2 a DataLoader around it
        data = TextDataModule(
            path=str(text_file),
            cache_dir=str(text_file.parent / "token_cache"),
            block_size=16,
            batch_size=4,
            num_workers=workers,
        )
        data.setup("fit")
        streams.append([x for x, _ in itertools.islice(data.train_dataloader(), 5)])
    assert all(torch.equal(a, b) for a, b in zip(*streams, strict=True))
    assert streams[0][0].shape == (4, 16)


def test_flops_formula_agrees_with_lightnings_measure_flops():
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    with torch.device("meta"):  # counts FLOPs without computing anything
        model = GPT(config)
        idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    counted = measure_flops(model, lambda: model(idx), lambda logits: logits.sum()) / idx.numel()
    # 6N counts the LayerNorm gains too, which no matmul uses: the one difference from a FLOP counter.
    norm_gains = sum(p.numel() for name, p in model.named_parameters() if "ln" in name)
    assert counted == model.flops_per_token() - 6 * norm_gains


@pytest.mark.parametrize(
    ("setting", "device", "pinned"),
    [(None, "cuda", True), (None, "cpu", False), (False, "cuda", False), (True, "cpu", True)],
)
def test_batches_are_pinned_when_training_on_cuda_unless_told(text_file: Path, setting, device: str, pinned: bool):
    data = TextDataModule(path=str(text_file), cache_dir=str(text_file.parent / "token_cache"), block_size=16,
                                 batch_size=4, pin_memory=setting)  # fmt: skip
    data.setup("fit")
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_rank=0,
                                   world_size=1, global_step=0, accumulate_grad_batches=1)  # fmt: skip
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader()}
    for name, loader in loaders.items():
        assert getattr(loader, "pin_memory", False) is pinned, name
