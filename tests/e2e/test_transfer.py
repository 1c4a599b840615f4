"""Fine-tuning measures transfer, not memory: the default target is text pre-training never trained on,
checkpoints say what they trained on, and a target inside that text is warned about (one whose speakers speak
only after the split is not). The one home of the overlap warning."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import yaml

from gpt_lightning.sources import open_source
from gpt_lightning.training.datamodule import TextDataModule
from tests.conftest import ROOT, assert_ok, cli, make_play
from tests.e2e.test_checkpoint_roles import pretraining_checkpoint
from tests.unit.test_token_cache import speeches_of

CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
WINDOW = 64
TEMPEST = "\n\nPROSPERO:\nNow does my project gather to a head.\n\nMIRANDA:\nO brave new world!\n"


def windows(text: str) -> set[str]:
    return {text[i : i + WINDOW] for i in range(len(text) - WINDOW + 1)}


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.is_file(), reason="needs the corpus copy in ../shared/data")
def test_the_default_fine_tune_target_shares_no_64_character_window_with_pretrainings_training_text(tmp_path):
    data_config = yaml.safe_load((ROOT / "configs/finetune.yaml").read_text())["data"]
    data = TextDataModule(data_dir=str(CORPUS.parents[1]), cache_dir=str(tmp_path), block_size=WINDOW,
                                 **data_config)  # fmt: skip
    data.setup("fit")
    assert data.val_tokens is not None and data.train_tokens is not None
    val_text, train_text = data.tokenizer.decode(data.val_tokens), data.tokenizer.decode(data.train_tokens)
    corpus = CORPUS.read_text(encoding="utf-8")
    split = int(len(corpus) * 0.9)  # pre-training's split, nanoGPT's
    assert train_text + val_text == speeches_of(corpus[split:], data_config["speakers"])  # the span, then speakers
    assert "PROSPERO:\n" in train_text and any(f"\n{name}:\n" in val_text for name in data_config["speakers"])
    pretraining = windows(corpus[:split])
    assert len(val_text) > 2000 and not windows(val_text) & pretraining
    assert not windows(train_text) & pretraining  # the fine-tune's training text is held out too


@pytest.mark.slow  # the `pretrained` fixture is a subprocess fit
def test_checkpoints_record_their_data_and_a_target_inside_it_is_warned_about(pretrained: Path, text_file: Path,
                                                                               tmp_path: Path):  # fmt: skip
    checkpoint = pretrained / "checkpoints" / "last.ckpt"
    recorded = open_source(checkpoint).data
    assert recorded == {
        "source": str(text_file),
        "source_sha256": hashlib.sha256(text_file.read_bytes()).hexdigest(),
        "selection": {"span": None, "speakers": None},
        "val_fraction": 0.1,
    }

    def fine_tune(**kwargs) -> TextDataModule:
        data = TextDataModule(path=str(text_file), cache_dir=str(tmp_path), init_from=str(checkpoint),
                                     speakers=["KING ARTHUR"], **kwargs)  # fmt: skip
        data.warn_of_overlap()
        return data

    with pytest.warns(UserWarning, match=r"about (8[5-9]|9\d)% of the fine-tuning text lies in the training split"):
        fine_tune()
    with pytest.warns(UserWarning, match=r"about (4\d|5\d)% of the fine-tuning text"):
        fine_tune(text_span=(0.8, 1.0))  # half of it lies before the checkpoint's split at 90%
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine_tune(text_span=(0.9, 1.0))  # held out: no warning


@pytest.fixture
def play_with_a_tempest(tmp_path: Path) -> Path:
    """Generated text whose last 10% holds the only speeches of finetune.yaml's speakers."""
    path = tmp_path / "play.txt"
    path.write_text(make_play(300) + TEMPEST * 8, encoding="utf-8")
    return path


def finetune(text: Path, checkpoint: Path, tmp_path: Path, *args: str):
    configs = ["--config", str(ROOT / "configs/finetune.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml")]
    return cli("fit", *configs, f"--model.init_from={checkpoint}", f"--data.path={text}",
               f"--data.cache_dir={tmp_path / 'cache'}",
               f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=1", "--data.batch_size=4",
               *args, in_process=True)  # fmt: skip


@pytest.mark.slow  # a CLI fit, in-process
@pytest.mark.parametrize("span", ["null", "[0.8, 1.0]"])
def test_speakers_absent_from_the_overlap_mean_no_overlap_not_an_error(play_with_a_tempest, tmp_path, span):
    checkpoint = pretraining_checkpoint(play_with_a_tempest, tmp_path / "pre.ckpt")
    result = finetune(play_with_a_tempest, checkpoint, tmp_path, f"--data.text_span={span}")
    assert_ok(result)
    assert "lies in the training split" not in result.stderr


def test_a_span_must_be_an_increasing_pair_of_fractions(text_file: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"text_span must be \[start, end\] with 0 <= start < end <= 1"):
        TextDataModule(path=str(text_file), cache_dir=str(tmp_path), text_span=(0.9, 0.5))
