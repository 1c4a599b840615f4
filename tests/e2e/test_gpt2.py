"""Starting from GPT-2: BPE tokens in the token cache, val/bpc on one scale for every tokenizer, fine-tuning
a Hugging Face GPT-2 folder with configs/finetune_gpt2.yaml, and the errors that keep tokenizers apart. No
network: the GPT-2 is a tiny random one that `transformers` saves, with a BPE trained on generated text."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gpt_lightning.data.token_cache as token_cache
import gpt_lightning.tokenizer as tokenizer_module
from gpt_lightning.data.token_cache import build_token_cache
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.sources import load_model
from gpt_lightning.tokenizer import BPETokenizer
from gpt_lightning.training.module import GPTModule
from tests.conftest import ROOT, TINY, assert_clean_error, assert_ok, cli, make_play, scalars
from tests.e2e.test_resume import assert_same_run
from tests.unit.test_hf import train_bpe

FINETUNE_GPT2 = ["fit", "--config", str(ROOT / "configs/finetune_gpt2.yaml")]
ON_CPU = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--progress_bar.refresh_rate=0",
          "--trainer.enable_model_summary=false"]  # fmt: skip


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory, bpe_file: Path) -> Path:
    """A Hugging Face GPT-2 folder with its own tokenizer.json and 256 positions (the recipe's context)."""
    transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers for these tests")
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(bpe_file.read_bytes())
    torch.manual_seed(0)
    vocab_size = BPETokenizer.from_file(bpe_file).vocab_size
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


# -- the token cache ----------------------------------------------------------------------------------


def test_bpe_encoded_in_pieces_equals_encoding_the_whole_text(tmp_path: Path, monkeypatch):
    # Small pieces, segments and batches put dozens of cuts in the text, inside words, speeches and runs of
    # spaces, and many batches of segments.
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", 777)
    monkeypatch.setattr(tokenizer_module, "SEGMENT_CHARS", 300)
    monkeypatch.setattr(tokenizer_module, "BATCH_CHARS", 1000)
    # Trained where blank lines come in threes, the BPE has GPT-2's "\n\n" token: a run of line breaks that
    # ends a piece would be one token, where the whole text splits it.
    bpe = BPETokenizer.from_file(train_bpe(tmp_path / "tokenizer.json", text=make_play(200).replace("\n\n", "\n\n\n")))
    assert len(bpe.encode("\n\n")) == 1  # one token
    text = make_play(150) + "Ça va, 東京?\n  indented line\n\n\n   \nKING ARTHUR:\nEnd.\n"
    path = tmp_path / "play.txt"
    path.write_text(text, encoding="utf-8")
    cache = build_token_cache(path, tmp_path / "cache", bpe=bpe)
    assert cache.tokens().tolist() == bpe.encode(text).tolist()
    assert cache.dtype == "uint16" and cache.num_chars == len(text) and cache.num_tokens < len(text)
    assert cache.tokenizer_sha256 == bpe.fingerprint
    # A later run with the same tokenizer reuses it; another tokenizer gets its own cache.
    assert build_token_cache(path, tmp_path / "cache", bpe=bpe).directory == cache.directory
    assert build_token_cache(path, tmp_path / "cache").directory != cache.directory


# GPT-4's pre-tokenizer regex (cl100k): digits in threes, punctuation joined to the letters that follow it.
GPT4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def train_gpt4_style_bpe(path: Path, text: str) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    tokenizer.save(str(path))
    return path


class EncoderSpy:
    """Stands in for a BPETokenizer's `tokenizers.Tokenizer` and records what bounds the memory of an encoding
    (the library takes about 180 bytes per character of one call): the longest text handed to it and the
    characters of each call; and the longest text it tracked offsets for (the slower path)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.longest, self.calls, self.longest_with_offsets = inner, 0, list[int](), 0

    def _saw(self, texts: list[str], offsets: bool) -> None:
        self.longest = max(self.longest, *map(len, texts))
        self.calls.append(sum(map(len, texts)))
        if offsets:
            self.longest_with_offsets = max(self.longest_with_offsets, *map(len, texts))

    def encode(self, text: str, **kwargs: Any) -> Any:
        self._saw([text], offsets=True)
        return self.inner.encode(text, **kwargs)

    def encode_batch(self, texts: list[str], **kwargs: Any) -> Any:
        self._saw(texts, offsets=True)
        return self.inner.encode_batch(texts, **kwargs)

    def encode_batch_fast(self, texts: list[str], **kwargs: Any) -> Any:
        self._saw(texts, offsets=False)
        return self.inner.encode_batch_fast(texts, **kwargs)


def spied(bpe: BPETokenizer) -> EncoderSpy:
    spy = EncoderSpy(bpe._tokenizer)
    bpe._tokenizer = spy  # type: ignore[assignment]
    return spy


def streamed_ids(bpe: BPETokenizer, text: str, piece_chars: int = 777) -> list[int]:
    pieces = [text[i : i + piece_chars] for i in range(0, len(text), piece_chars)]
    return np.concatenate(list(bpe.encode_pieces(pieces))).tolist()


PLAY = make_play(120, seed=5)
TEXT_SHAPES = {
    "LF": PLAY,
    "CRLF": PLAY.replace("\n", "\r\n"),
    "one line": PLAY.replace("\n", " "),
    "indented": "    " + PLAY.replace("\n", "\n    ").replace("    KING", "\tKING"),
    "runs of spaces and line breaks": PLAY.replace(",\n", "," + " " * 700 + "\n", 3)
    .replace("?\n", "?" + "\n" * 700, 3)
    .replace(";\n", ";" + "\r\n" * 300 + "  ", 3),
    "multi-byte, one line": " ".join(["Ça va? — «naïve» façade, 東京は大きい。🎭🎭 1234567 ok!"] * 250),
}


@pytest.fixture(scope="module", params=["GPT-2 regex", "GPT-4 regex"])
def any_bpe_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Trained where blank lines come in threes: both have GPT-2's "\n\n" token (see the test above).
    text, path = make_play(200).replace("\n\n", "\n\n\n"), tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return train_bpe(path, text=text) if request.param == "GPT-2 regex" else train_gpt4_style_bpe(path, text)


@pytest.mark.parametrize("shape", TEXT_SHAPES)
def test_text_of_any_shape_is_encoded_in_bounded_pieces_to_the_whole_texts_ids(any_bpe_file, monkeypatch, shape):
    monkeypatch.setattr(tokenizer_module, "SEGMENT_CHARS", 300)
    bpe = BPETokenizer.from_file(any_bpe_file)
    text = TEXT_SHAPES[shape]
    expected = bpe.encode(text).tolist()
    spy = spied(bpe)
    assert streamed_ids(bpe, text) == expected
    # Never the whole text (10,000 characters and more) in one call: pieces of about 300 characters, and
    # what a cut after a run of 700 blanks holds.
    assert spy.longest <= 4 * 300 < len(text) / 8, spy.longest


def test_segments_are_encoded_in_batches_of_bounded_text_ids_only_to_the_whole_texts_ids(any_bpe_file, monkeypatch):
    # Segments of about 2,000 characters, batches of at most 5,000: a text of 42,000 characters handed over
    # in one piece (as a caller may) is encoded in at least 8 batches, never in one call.
    monkeypatch.setattr(tokenizer_module, "SEGMENT_CHARS", 2000)
    monkeypatch.setattr(tokenizer_module, "BATCH_CHARS", 5000)
    bpe = BPETokenizer.from_file(any_bpe_file)
    text = PLAY * 4
    expected = bpe.encode(text).tolist()
    spy = spied(bpe)
    assert streamed_ids(bpe, text, piece_chars=len(text)) == expected
    assert max(spy.calls) <= 5000 and len([c for c in spy.calls if c > 3000]) >= len(text) // 5000, spy.calls
    # Offsets (what says where the tokenizer ends a pre-token) only for the windows around a cut (768
    # characters); the segments themselves are encoded as ids alone, which the library does faster.
    assert spy.longest_with_offsets <= 3 * 256 < 2000 <= spy.longest, (spy.longest_with_offsets, spy.longest)


def test_a_prefix_space_tokenizer_is_cut_only_before_a_space(tmp_path: Path, monkeypatch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    monkeypatch.setattr(tokenizer_module, "SEGMENT_CHARS", 300)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a space before every input
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([make_play(50)], trainers.BpeTrainer(vocab_size=280))
    bpe = BPETokenizer(tokenizer.to_str())
    text = make_play(100)
    expected = bpe.encode(text).tolist()
    spy = spied(bpe)
    assert streamed_ids(bpe, text) == expected and spy.longest <= 4 * 300


@pytest.mark.parametrize("case", ["one word", "a prefix on every input"])
def test_text_that_cannot_be_cut_stops_with_an_error_before_it_is_encoded_whole(tmp_path: Path, monkeypatch, case):
    from tokenizers import Tokenizer, normalizers

    monkeypatch.setattr(tokenizer_module, "SEGMENT_CHARS", 300)
    monkeypatch.setattr(tokenizer_module, "MAX_UNCUT_CHARS", 5000, raising=False)
    bpe = BPETokenizer.from_file(train_bpe(tmp_path / "tokenizer.json"))
    if case == "one word":
        text, message = make_play(10) + "a" * 20_000 + make_play(10), r"no place between two of its tokens"
    else:  # as SentencePiece's "▁" before the first word (Llama 2's tokenizer.json)
        prefixed = Tokenizer.from_str(bpe.tokenizer_json)
        prefixed.normalizer = normalizers.Prepend("▁")
        bpe, text, message = BPETokenizer(prefixed.to_str()), make_play(200), r"cannot be encoded in pieces"
    spy = spied(bpe)
    with pytest.raises(ValueError, match=rf"more than 5,000 characters.*{message}"):
        streamed_ids(bpe, text)
    assert spy.longest < 5000 + 4 * 777  # what it held, never encoded whole


# -- bits per character ---------------------------------------------------------------------------------


def test_characters_per_token_add_up_to_the_text_with_multibyte_characters(bpe_file: Path):
    bpe = BPETokenizer.from_file(bpe_file)
    text = "KING ARTHUR: 東京 and Ça va, lord!"
    ids = bpe.encode(text)
    counts = bpe.characters_per_token()
    assert counts[ids].sum().item() == len(text)  # 東's three byte tokens count one character between them
    assert sorted(counts[ids].unique().tolist())[0] == 0  # a continuation byte starts no character


def test_val_bpc_is_bits_per_character_of_the_text_for_bpe(bpe_file: Path):
    bpe = BPETokenizer.from_file(bpe_file)
    module = GPTModule(vocab=bpe.to_dict(), block_size=64, n_layer=1, n_head=1, n_embd=8)
    with torch.no_grad():
        module.gpt.lm_head.weight.zero_()  # the tied embedding too: uniform logits, a loss of ln V per token
    text = "KING ARTHUR:\nGood lord, my king! Ça va."
    ids = bpe.encode(text)
    x, y = ids[:-1][None], ids[1:][None]
    module.validation_step((x, y), 0)
    tokens, characters = y.numel(), len(bpe.decode(y[0]))  # by hand: the text that the targets stand for
    assert characters > tokens  # BPE: several characters per token
    assert module.val_loss.compute().item() == pytest.approx(math.log(bpe.vocab_size), rel=1e-6)
    expected = tokens * math.log2(bpe.vocab_size) / characters
    assert module.val_bpc.compute().item() == pytest.approx(expected, rel=1e-6)


def test_gpt2_small_with_gpt2s_vocabulary_has_124m_parameters():
    with torch.device("meta"):
        gpt = GPT(GPTConfig(vocab_size=50_257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True))
    assert gpt.num_parameters() == 124_439_808  # the position table included, the head tied


# -- fine-tuning GPT-2 with the recipe --------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_gpt2_recipe_fits_resumes_bit_exactly_samples_and_exports(
    gpt2_folder: Path, text_file: Path, tmp_path: Path
):
    transformers = pytest.importorskip("transformers")

    def fit(runs: Path, *args: str) -> subprocess.CompletedProcess:
        # The recipe, on generated text (not The Tempest: no speakers to select), as the README's CPU check.
        recipe = [*FINETUNE_GPT2, f"--data.path={text_file}", "--data.speakers=null", "--data.text_span=null",
                  f"--data.cache_dir={tmp_path / 'cache'}", f"--trainer.logger.init_args.save_dir={runs}",
                  "--last_checkpoint.every_n_train_steps=3", "--model.lr_decay_steps=6",
                  "--trainer.log_every_n_steps=1", *ON_CPU]  # fmt: skip
        return cli(*recipe, *args, in_process=True)

    # The recipe pads GPT-2's 50,257 tokens to 50,304 rows; this folder's 300 tokens, to 320: a multiple of 64.
    padded = "--model.vocab_size=320"
    assert_ok(fit(tmp_path / "a", f"--model.init_from={gpt2_folder}", "--trainer.max_steps=6", padded))
    assert_ok(fit(tmp_path / "b", f"--model.init_from={gpt2_folder}", "--trainer.max_steps=3", padded))
    assert_ok(fit(tmp_path / "b", "--model.init_from=null", "--ckpt_path=last", "--trainer.max_steps=6"))
    straight, resumed = (tmp_path / run / "finetune_gpt2" / "version_0" for run in ("a", "b"))
    assert_same_run(straight, resumed, 6)  # dropout 0.1 in the recipe: the masks are drawn again exactly
    assert "val/bpc" in scalars(straight)

    ckpt = straight / "checkpoints" / "last.ckpt"
    sample = cli("generate", f"--ckpt_path={ckpt}", "--prompt=KING ARTHUR:", "--max_new_tokens=20", "--seed=2",
                 in_process=True)  # fmt: skip
    assert_ok(sample)
    assert sample.stdout.startswith("KING ARTHUR:")
    assert_ok(cli("export", f"--ckpt_path={ckpt}", f"--output={tmp_path / 'hf'}", in_process=True))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    ours, tokenizer = load_model(ckpt)
    assert (ours.config.vocab_size, ours.wte.num_embeddings) == (300, 320)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.vocab_size == 300  # the tokens only: its generate cannot write a padding id
    ids = tokenizer.encode("KING ARTHUR:\nGood lord, my king! Ça va.")[None]
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)
    # And back in: the exported folder is a start for another fine-tune, with the same logits.
    again = GPTModule(vocab=tokenizer.to_dict(), block_size=256, init_from=str(tmp_path / "hf")).gpt.eval()
    with torch.no_grad():
        assert torch.allclose(again(ids), ours(ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_our_character_checkpoint_exported_is_a_start_with_its_logits(pretrained: Path, tmp_path: Path):
    from gpt_lightning.hf import gpt_from_hf_gpt2

    ckpt = pretrained / "checkpoints" / "last.ckpt"
    assert_ok(cli("export", f"--ckpt_path={ckpt}", f"--output={tmp_path / 'hf'}", in_process=True))
    ours, tokenizer = load_model(ckpt)
    module = GPTModule(vocab=tokenizer.vocab, block_size=ours.config.block_size, init_from=str(tmp_path / "hf"))
    ids = tokenizer.encode("KING ARTHUR:\nGood lord")[None]
    with torch.no_grad():
        assert torch.allclose(module.gpt.eval()(ids), ours(ids), atol=1e-5, rtol=0)
        assert torch.allclose(gpt_from_hf_gpt2(tmp_path / "hf")(ids), ours(ids), atol=1e-6, rtol=0)  # read back alone


@pytest.mark.slow
def test_bpe_token_cache_under_ddp_on_cpu(bpe_file: Path, text_file: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    result = cli("fit", "--config", str(ROOT / "configs/pretrain_cpu.yaml"), "--config",
                 str(ROOT / "configs/trainer/ddp_cpu.yaml"), f"--data.path={text_file}", f"--data.tokenizer={bpe_file}",
                 f"--data.cache_dir={runs}/token_cache", f"--trainer.logger.init_args.save_dir={runs}",
                 *TINY, "--trainer.max_steps=4", "--trainer.val_check_interval=4")  # fmt: skip
    assert_ok(result)
    assert (result.stdout + result.stderr).count("encoding data.path") == 1  # once, by rank 0
    [cache] = [json.loads(p.read_text()) for p in (runs / "token_cache").glob("*/meta.json")]
    bpe = BPETokenizer.from_file(bpe_file)
    assert cache["tokenizer_sha256"] == bpe.fingerprint
    [token_file] = (runs / "token_cache").glob("*/tokens-*.bin")
    tokens = np.fromfile(token_file, dtype=np.uint16)
    assert tokens.tolist() == bpe.encode(text_file.read_text(encoding="utf-8")).tolist()
    _, tokenizer = load_model(runs / "pretrain_cpu" / "version_0" / "checkpoints" / "last.ckpt")
    assert tokenizer == bpe  # the checkpoint carries the tokenizer in full


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.block_size=512"], "data.block_size 512 exceeds the 256 positions of .*use 256 or less"),
        (
            ["--data.tokenizer=char"],
            "data.tokenizer char is not the tokenizer of .*a 300-token BPE",
        ),
        (["--data.tokenizer=missing/tokenizer.json"], "data.tokenizer 'missing/tokenizer.json' is neither char"),
    ],
    ids=["block_size above the checkpoint's", "char text into a BPE checkpoint", "no such tokenizer"],
)
def test_gpt2_fine_tune_errors_are_clear(gpt2_folder: Path, text_file: Path, tmp_path: Path, args, message):
    result = cli(*FINETUNE_GPT2, f"--model.init_from={gpt2_folder}", f"--data.path={text_file}",
                 "--data.speakers=null", *ON_CPU, *args, in_process=True)  # fmt: skip
    assert_clean_error(result, message)


def test_another_bpe_than_the_checkpoints_is_refused(gpt2_folder: Path, text_file: Path, tmp_path: Path):
    from gpt_lightning.training.datamodule import TextDataModule

    other = train_bpe(tmp_path / "other.json", vocab_size=290)
    with pytest.raises(ValueError, match="is not the tokenizer of"):
        TextDataModule(path=str(text_file), tokenizer=str(other), init_from=str(gpt2_folder))
    # The same tokenizer, written differently, is the same tokenizer.
    same = tmp_path / "same.json"
    same.write_text(json.dumps(json.loads((gpt2_folder / "tokenizer.json").read_text()), indent=4))
    TextDataModule(path=str(text_file), tokenizer=str(same), init_from=str(gpt2_folder))


def test_a_padded_start_says_once_how_much_padding_it_carries(gpt2_folder: Path, caplog: pytest.LogCaptureFixture):
    import logging

    caplog.set_level(logging.INFO)
    bpe = BPETokenizer.from_file(gpt2_folder / "tokenizer.json")
    module = GPTModule(vocab=bpe.to_dict(), block_size=64, init_from=str(gpt2_folder), vocab_size=320)
    assert module.gpt.num_parameters() == GPTModule(vocab=bpe.to_dict(), block_size=64,
                                                    init_from=str(gpt2_folder)).gpt.num_parameters()  # fmt: skip
    assert caplog.text.count("model.vocab_size 320: 20 padding rows past the 300 tokens (640 parameters") == 1


def test_lora_on_gpt2_weights_starts_as_gpt2(gpt2_folder: Path):
    from gpt_lightning.hf import gpt_from_hf_gpt2
    from gpt_lightning.lora import LoRAConfig

    bpe = BPETokenizer.from_file(gpt2_folder / "tokenizer.json")
    module = GPTModule(vocab=bpe.to_dict(), block_size=64, init_from=str(gpt2_folder), lora=LoRAConfig(rank=4))
    base = gpt_from_hf_gpt2(gpt2_folder, block_size=64)
    ids = bpe.encode("KING ARTHUR:\nGood lord, my king")[None]
    with torch.no_grad():
        assert torch.equal(module.gpt.eval()(ids), base(ids))
    assert all(p.requires_grad == ("lora" in name) for name, p in module.gpt.named_parameters())
