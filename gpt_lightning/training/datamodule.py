"""The LightningDataModule: which text, how it is split, and the loaders that serve it."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from gpt_lightning.data.corpus import (
    CORPUS_URL,
    VAL_FRACTION,
    RandomWindows,
    SequentialWindows,
    build_state_dir,
    check_folder,
    check_val_fraction,
    clear_failure,
    corpus_path,
    ensure_corpus,
    is_local_rank_zero,
    os_errors_named,
    record_failure,
    validation_start,
)
from gpt_lightning.data.instruct import Template
from gpt_lightning.data.token_cache import (
    Selection,
    TokenCache,
    build_token_cache,
    cache_dir_for,
    count_characters,
    wait_for_token_cache,
)
from gpt_lightning.sources import ModelSource, open_source
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_spec

DEFAULT_BLOCK_SIZE = 256


def pin_memory_for(setting: bool | None, trainer: L.Trainer | None) -> bool:
    """data.pin_memory, unset meaning: when training on CUDA. A pinned batch is copied to the GPU
    asynchronously (Lightning copies with non_blocking), so the host goes on to the next batch at once."""
    if setting is not None:
        return setting
    return trainer is not None and trainer.strategy.root_device.type == "cuda"


class TextDataModule(L.LightningDataModule):
    template: Template | None = None  # plain text has no template: a model of it continues text (cf. TaskDataModule)

    def __init__(
        self,
        data_dir: str = "data",
        corpus_source: str = CORPUS_URL,
        path: str | None = None,
        tokenizer: str | None = None,
        cache_dir: str | None = None,
        skip_undecodable: bool = False,
        speakers: list[str] | None = None,
        text_span: tuple[float, float] | None = None,
        block_size: int | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        val_fraction: float = VAL_FRACTION,
        seed: int = 1337,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        init_from: str | None = None,
    ) -> None:
        """Character batches of tiny Shakespeare, or of your own text.

        Args:
            data_dir: Folder that caches the corpus as `<data_dir>/tinyshakespeare/input.txt`. A missing file
                is downloaded once and checked against its sha256; put a local copy there to work offline.
            corpus_source: Where a missing corpus comes from: its canonical URL, or a local copy (a path or a
                file:// URL), e.g. on a cluster's shared disk, copied into each node's own data_dir.
            path: Your own UTF-8 text to train on instead of the corpus: a file, a folder (its .txt files,
                recursively) or a glob such as 'src/**/*.py'. Several files are read in sorted order with a
                blank line between them. Any size: it is encoded once into a token file that every process
                memory-maps.
            tokenizer: How text becomes tokens: char (one token per character of the text's own vocabulary, as
                in nanoGPT's shakespeare_char), gpt2 (GPT-2's byte-level BPE, from the Hugging Face hub), or the
                path of a Hugging Face tokenizer.json. Unset: the `init_from` checkpoint's, else char. A model
                reads only the ids of its own tokenizer: another one than the checkpoint's is an error.
            cache_dir: Where encoded token files are kept, one folder per input. Unset: <data_dir>/token_cache.
                Later runs reuse them; changed inputs are encoded again.
            skip_undecodable: Leave out the files of `path` that are not UTF-8 (they are listed, and recorded in
                checkpoints) instead of stopping with an error that names them all.
            speakers: Train only on the speeches of these characters (e.g. [ROMEO, JULIET]): a fine-tuning
                target drawn from the corpus (or from `path`) that needs nothing else.
            text_span: Use only this part of the text, as [start, end] fractions of its characters, before
                `speakers` selects from it. [0.9, 1.0] is the corpus's last 10%: the validation split of
                a pre-training run, text it never trained on (the default fine-tune's target).
            block_size: Context length in tokens. Unset: the `init_from` checkpoint's, else 256. A GPT-2 start may
                crop its context (1024 positions) to less, never extend it.
            batch_size: Sequences per batch on each device.
            val_batch_size: Sequences per validation batch. Unset: 4 x batch_size, since a forward pass
                without gradients needs far less memory, and larger batches run faster.
            val_fraction: Share of the text, taken from its end, held out for validation (nanoGPT: 0.1).
            seed: Seed of the training windows. Batch i on rank r depends only on (seed, r, i), so ranks
                draw different windows and a resumed run draws exactly what it would have drawn.
            num_workers: DataLoader worker processes. Batches are one gather each, so 0 is fastest on CPU.
            pin_memory: Pin batches in page-locked memory, so that their copy to a GPU does not hold up the host.
                Unset: when training on CUDA.
            init_from: Set by the CLI: the checkpoint whose vocabulary and block size to use (`model.init_from`
                when fine-tuning, `--ckpt_path` when resuming or validating).
        """
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}.")
        if block_size is not None and block_size < 1:
            raise ValueError(f"data.block_size must be >= 1, got {block_size}.")
        check_val_fraction(val_fraction)
        self.data_dir = data_dir
        self.corpus_source = corpus_source
        self.path = path
        self.cache_dir = cache_dir
        self.skip_undecodable = skip_undecodable
        self.speakers = speakers
        self.text_span = text_span
        self.selection = Selection(
            span=None if text_span is None else (float(text_span[0]), float(text_span[1])),
            speakers=None if not speakers else tuple(speakers),
        )
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or 4 * batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.init_from = init_from
        self._source: ModelSource | None = None if init_from is None else open_source(init_from)
        self._bpe = self._resolve_bpe(tokenizer)
        self.block_size = self._resolve_block_size(block_size)
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None

    def _resolve_bpe(self, spec: str | None) -> BPETokenizer | None:
        """The BPE tokenizer that encodes the text, None for characters: the checkpoint's when there is one."""
        asked = None if spec is None else tokenizer_from_spec(spec)
        if self._source is None:
            return asked
        source = self._source.tokenizer_for(asked, spec)
        return source if isinstance(source, BPETokenizer) else None

    def _resolve_block_size(self, block_size: int | None) -> int:
        if self._source is None:
            return DEFAULT_BLOCK_SIZE if block_size is None else block_size
        return self._source.config_for({"data.block_size": block_size}).block_size

    @cached_property
    def token_cache(self) -> TokenCache:
        """The text, encoded: built by local rank 0 of each node (also when the CLI first asks for the
        vocabulary, before any process group exists); the other processes wait for it and map it."""
        root = Path(self.cache_dir) if self.cache_dir is not None else Path(self.data_dir) / "token_cache"
        bpe = self._bpe
        vocab = None if self._source is None or bpe is not None else cast(CharTokenizer, self._source.tokenizer).vocab
        what = "data.path" if self.path is not None else "the corpus"
        # Where local rank 0 leaves its error, so that the node's other processes stop with it at once
        # instead of waiting for a cache that will never come (nothing else would stop them under srun).
        skip = self.skip_undecodable
        key = cache_dir_for(root, self.path or corpus_path(self.data_dir), self.selection, vocab, skip, bpe).name
        failure = build_state_dir(root) / f"{key}.{socket.gethostname()}.failed.json"
        cache_dir = self.cache_dir if self.cache_dir is not None else "unset (<data_dir>/token_cache)"
        hint = (f"data.data_dir is {self.data_dir} and data.cache_dir {cache_dir}: each must be a folder that this "
                "process can write (a missing one is created), and the text files readable.")  # fmt: skip
        # Every process checks the folders, so that none waits for a builder that cannot build.
        with os_errors_named(hint):
            if self.path is None or self.cache_dir is None:
                check_folder(Path(self.data_dir), "data.data_dir")
            if self.cache_dir is not None:
                check_folder(root, "data.cache_dir")
            if not is_local_rank_zero():
                spec = self.path if self.path is not None else self._corpus(download=False, failure_marker=failure)
                return wait_for_token_cache(spec, root, vocab=vocab, selection=self.selection, failure_marker=failure,
                                            skip_undecodable=skip, bpe=bpe)  # fmt: skip
        clear_failure(failure)  # an earlier launch's
        try:
            with os_errors_named(hint):
                spec = self.path if self.path is not None else self._corpus(download=True)
                cache = build_token_cache(spec, root, vocab=vocab, selection=self.selection, what=what,
                                          skip_undecodable=skip, bpe=bpe)  # fmt: skip
        except Exception as err:
            record_failure(failure, err)  # never raises: the error the user sees is this one
            raise
        if cache.skipped:
            shown = ", ".join(cache.skipped[:10]) + (", ..." if len(cache.skipped) > 10 else "")
            rank_zero_warn(f"data.skip_undecodable: left out {len(cache.skipped)} files that are not UTF-8: {shown}")
        return cache

    def describe(self) -> dict[str, Any]:
        """What this module serves, for checkpoints: a later fine-tune can tell whether its target
        overlaps the text this run trained on."""
        cache = self.token_cache
        described = {
            "source": self.path if self.path is not None else self.corpus_source,
            "source_sha256": cache.source_sha256,
            "selection": cache.selection,
            "val_fraction": self.val_fraction,
        }
        return {**described, "skipped": cache.skipped} if cache.skipped else described

    def warn_of_overlap(self) -> None:
        """Warns when the fine-tuning text lies (partly) in the training split of the `init_from` run: a low
        validation loss there would measure memory, not transfer. It measures, and never fails a run."""
        trained_on = None if self._source is None else self._source.data
        cache = self.token_cache
        if not trained_on or trained_on.get("source_sha256") != cache.source_sha256:
            return  # other text, or a checkpoint that does not say
        if trained_on.get("selection") != Selection().to_dict():
            return  # pre-trained on a part of the text: its split is not a span of this text
        train_end = 1.0 - float(trained_on["val_fraction"])
        start, end = self.selection.span or (0.0, 1.0)
        if start >= train_end:
            return
        spec = self.path if self.path is not None else self._corpus(download=False)
        inside = count_characters(spec, Selection((start, min(end, train_end)), self.selection.speakers))
        if inside == 0:
            return  # e.g. none of the selected speakers speaks before the split
        rank_zero_warn(
            f"about {inside / cache.characters:.0%} of the fine-tuning text lies in the training split of "
            f"{self.init_from} (the first {train_end:.0%} of the same text): a low validation loss there measures "
            f"memory, not transfer. Select held-out text, e.g. --data.text_span '[{train_end:g}, 1.0]'."
        )

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer: the `init_from` checkpoint's when fine-tuning, else data.tokenizer's (for characters,
        the text's own, in sorted order)."""
        return self._bpe if self._bpe is not None else CharTokenizer(self.token_cache.vocab)

    @property
    def vocab(self) -> str | dict[str, str]:
        """Linked into the model by the CLI, so the vocabulary is written in one place only: the characters in
        id order, or a BPE tokenizer's state."""
        tokenizer = self.tokenizer
        return tokenizer.vocab if isinstance(tokenizer, CharTokenizer) else tokenizer.to_dict()

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node; the others wait at a barrier.
        self.token_cache  # noqa: B018 (downloads and encodes what is missing)

    def _corpus(self, download: bool, failure_marker: Path | None = None) -> Path:
        source = self.corpus_source
        url = source if "://" in source else Path(source).resolve().as_uri()
        return ensure_corpus(self.data_dir, download=download, url=url, failure_marker=failure_marker)

    def setup(self, stage: str) -> None:
        if self.train_tokens is not None:
            return
        tokens = self.token_cache.tokens()  # uint8/16/32, mapped from disk; batches become int64
        split = validation_start(tokens.numel(), self.val_fraction)
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        SequentialWindows(self.val_tokens, self.block_size)  # checks the split holds one window at least
        if self.train_tokens.numel() - self.block_size < self.batch_size:
            raise ValueError(
                f"data.batch_size {self.batch_size} does not fit the data: the training split has only "
                f"{self.train_tokens.numel()} tokens. Lower batch_size or block_size, or add text."
            )

    def train_dataloader(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        assert self.train_tokens is not None, "setup() first"
        rank, start = 0, 0
        if self.trainer is not None:
            rank = self.trainer.global_rank
            # Batches this rank has consumed so far: resuming continues the stream where it stopped.
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        dataset = RandomWindows(self.train_tokens, self.block_size, self.batch_size, self.seed, rank, start)
        pin = pin_memory_for(self.pin_memory, self.trainer)
        if self.num_workers == 0 and not pin:
            # The dataset yields whole batches, one gather each. With no workers to run and nothing to pin,
            # a DataLoader around it would only add work to every step. Lightning takes any iterable.
            return dataset
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=pin)

    def val_dataloader(self) -> DataLoader:
        assert self.val_tokens is not None, "setup() first"
        windows = SequentialWindows(self.val_tokens, self.block_size)
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            # Lightning's own DistributedSampler pads each rank's share with repeated windows when the world
            # size does not divide the window count, which skews val/loss. Each window once, on one rank:
            # shares differ by one window at most, and the character-weighted mean is reduced over ranks.
            world = self.trainer.world_size
            if len(windows) < world:
                raise ValueError(
                    f"the validation split has {len(windows)} windows of block_size {self.block_size}, fewer "
                    f"than the {world} processes: use fewer devices, a smaller block_size or more text."
                )
            sampler = UnrepeatedDistributedSampler(windows, num_replicas=world, rank=self.trainer.global_rank,
                                                   shuffle=False)  # fmt: skip
        return DataLoader(
            windows,
            batch_size=self.val_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=pin_memory_for(self.pin_memory, self.trainer),
        )


# The class's name until it was named for what it takes: configs and checkpoints that name it keep working.
ShakespeareDataModule = TextDataModule
