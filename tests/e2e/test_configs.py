"""Every shipped YAML parses, and the recipes build the presets they claim to."""

import importlib
import sys
from pathlib import Path

import pytest
import yaml

from gpt_lightning.model import PRESETS
from gpt_lightning.training.cli import main
from tests.conftest import ROOT

CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
# Partial configs are layered on a recipe, as the README shows.
BASE = {
    "trainer/": "configs/pretrain_cpu.yaml",
    "model/": "configs/pretrain.yaml",
    "finetune": "configs/pretrain_cpu.yaml",
    "gpu/": "configs/finetune_gpt2.yaml",
}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["main.py"])  # LightningCLI warns when pytest's arguments sit beside `args`


def parsed(capsys: pytest.CaptureFixture, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_configs_are_found():
    assert {"configs/pretrain.yaml", "configs/pretrain_cpu.yaml", "configs/finetune.yaml", "configs/generate.yaml",
            "configs/trainer/cpu.yaml", "configs/trainer/gpu.yaml", "configs/trainer/ddp.yaml",
            "configs/trainer/ddp_cpu.yaml"} <= set(CONFIGS)  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config: str, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    if config == "configs/generate.yaml":
        result = parsed(capsys, "generate", "--config", config, "--ckpt_path=any.ckpt")
        assert result["ckpt_path"] == "any.ckpt"
        return
    base = next((b for prefix, b in BASE.items() if config.removeprefix("configs/").startswith(prefix)), None)
    layers = ["--config", base] if base else []
    result = parsed(capsys, "fit", *layers, "--config", config)
    assert result["trainer"]["max_steps"] > 0


@pytest.mark.parametrize(
    ("configs", "preset"),
    [
        (["configs/pretrain_cpu.yaml"], "cpu"),
        (["configs/pretrain.yaml"], "baby-gpt"),
        (["configs/pretrain.yaml", "configs/model/gpt2_small.yaml"], "gpt2-small"),
    ],
)
def test_recipes_build_their_presets(configs, preset, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = parsed(capsys, "fit", *[arg for c in configs for arg in ("--config", c)])
    expected = PRESETS[preset]
    model = result["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["bias"]) == (
        expected.n_layer, expected.n_head, expected.n_embd, expected.bias)  # fmt: skip
    assert result["data"]["init_args"]["block_size"] == expected.block_size


def test_the_gpt2_shapes_pad_the_vocabulary_to_a_multiple_of_64_and_the_character_recipes_do_not(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for layers in (["configs/pretrain_cpu.yaml", "configs/finetune_gpt2.yaml"], ["configs/pretrain.yaml",
                   "configs/model/gpt2_small.yaml"]):  # fmt: skip
        model = parsed(capsys, "fit", *[arg for c in layers for arg in ("--config", c)])["model"]
        assert (model["vocab_multiple"], model["vocab_size"]) == (64, None), layers
    for recipe in ("pretrain.yaml", "pretrain_cpu.yaml", "finetune.yaml"):  # their README figures stay put
        model = parsed(capsys, "fit", "--config", f"configs/{recipe}")["model"]
        assert (model["vocab_multiple"], model["vocab_size"]) == (1, None), recipe


def test_pretrain_recipe_is_nanogpts_shakespeare_char(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = parsed(capsys, "fit", "--config", "configs/pretrain.yaml")
    model, trainer = result["model"], result["trainer"]
    assert result["data"]["class_path"] == "gpt_lightning.training.datamodule.TextDataModule"  # text, by default
    assert result["data"]["init_args"]["batch_size"] == 64 and trainer["max_steps"] == 5000
    assert (model["learning_rate"], model["min_lr"], model["warmup_steps"]) == (1e-3, 1e-4, 100)
    assert (model["betas"], model["weight_decay"], trainer["gradient_clip_val"]) == ([0.9, 0.99], 0.1, 1.0)
    assert trainer["precision"] == "bf16-mixed" and model["dropout"] == 0.2


def test_finetune_config_is_a_small_diff(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = Path(ROOT / "configs/finetune.yaml").read_text()
    assert len([line for line in text.splitlines() if line.strip() and not line.startswith("#")]) <= 20
    result = parsed(capsys, "fit", "--config", "configs/pretrain_cpu.yaml", "--config", "configs/finetune.yaml")
    assert result["model"]["init_from"] and result["model"]["learning_rate"] < 1e-3


def test_the_task_fine_tune_is_a_small_diff_that_reads_task_data(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = Path(ROOT / "configs/finetune_task.yaml").read_text()
    assert len([line for line in text.splitlines() if line.strip() and not line.startswith("#")]) <= 25
    result = parsed(capsys, "fit", "--config", "configs/finetune_task.yaml", "--config", "configs/trainer/cpu.yaml")
    data = result["data"]
    assert data["class_path"] == "gpt_lightning.training.task_datamodule.TaskDataModule"
    assert data["init_args"]["task"] == "reverse-words" and data["init_args"]["template"] == "plain"


@pytest.mark.parametrize(
    ("config", "compiled"),
    [
        ("configs/pretrain.yaml", True),
        ("configs/pretrain_muon.yaml", True),
        ("configs/finetune_gpt2.yaml", False),
        ("configs/pretrain_cpu.yaml", False),
    ],
)
def test_the_long_gpu_recipes_compile_and_opt_out_with_false(config: str, compiled: bool, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert parsed(capsys, "fit", "--config", config)["model"]["compile"] is compiled
    assert parsed(capsys, "fit", "--config", config, "--model.compile=false")["model"]["compile"] is False
    assert parsed(capsys, "fit", "--config", config, "--model.compile=reduce-overhead")["model"]["compile"] == (
        "reduce-overhead"
    )


CARD_PRESETS = sorted(c for c in CONFIGS if c.startswith("configs/gpu/gpt2_"))


@pytest.mark.parametrize("preset", CARD_PRESETS)
def test_a_card_preset_keeps_its_computed_memory_within_three_quarters_of_the_card(preset: str, capsys, monkeypatch):
    from benchmarks.gpt2_cpu import step_memory_bytes  # the project's memory table, row by row
    from gpt_lightning.lora import LoRAConfig

    monkeypatch.chdir(ROOT)
    result = parsed(capsys, "fit", "--config", "configs/finetune_gpt2.yaml", "--config", preset)
    data, model, trainer = result["data"]["init_args"], result["model"], result["trainer"]
    card_gb = int(preset.removesuffix("gb.yaml").rsplit("_", 1)[1])
    lora = LoRAConfig(**model["lora"])
    memory = step_memory_bytes(model["init_from"], data["batch_size"], data["block_size"], lora)
    assert memory <= 0.75 * card_gb * 1e9, f"{preset}: {memory / 1e9:.1f} GB on a {card_gb} GB card"
    assert lora.enabled == ("_lora_" in preset) and data["block_size"] == 1024
    assert data["batch_size"] * trainer["accumulate_grad_batches"] == 32  # the same step on every card
    assert trainer["val_check_interval"] == 50 * trainer["accumulate_grad_batches"]  # micro-batches: 50 steps


@pytest.mark.parametrize(
    "old_path",
    ["gpt_lightning.datamodule.ShakespeareDataModule", "gpt_lightning.training.datamodule.ShakespeareDataModule"],
)
def test_the_data_modules_old_names_in_earlier_configs_still_load(old_path: str, capsys, monkeypatch, tmp_path: Path):
    from gpt_lightning.training.datamodule import TextDataModule

    monkeypatch.chdir(ROOT)
    earlier = tmp_path / "config.yaml"  # as a run's saved config.yaml named the class before
    earlier.write_text(yaml.safe_dump({"data": {"class_path": old_path, "init_args": {"batch_size": 7}}}))
    result = parsed(capsys, "fit", "--config", "configs/pretrain_cpu.yaml", "--config", str(earlier))
    assert result["data"]["init_args"]["batch_size"] == 7
    module, name = result["data"]["class_path"].rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is TextDataModule
