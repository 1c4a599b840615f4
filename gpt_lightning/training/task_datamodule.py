"""The LightningDataModule of task data: prompt/response examples from JSONL files or a built-in task, in batches
padded to their longest example or packed into rows of the block size, with the loss on the responses only
(instruct.py has the formats)."""

from __future__ import annotations

import math
import random
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from gpt_lightning.data.corpus import check_val_fraction, sha256_of
from gpt_lightning.data.instruct import (
    Example,
    ExampleBatches,
    Format,
    TaskDataError,
    Template,
    collate,
    encode_example,
    missing_characters,
    pack,
    read_examples,
    template_named,
)
from gpt_lightning.data.synthetic_tasks import synthetic_task
from gpt_lightning.sources import ModelSource, open_source
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_spec
from gpt_lightning.training.datamodule import pin_memory_for


class TaskDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        task: str | None = None,
        format: Format = "auto",
        template: str = "plain",
        train_on_prompt: bool = False,
        task_examples: int = 10000,
        tokenizer: str | None = None,
        grow_vocab: bool = False,
        data_dir: str = "data",
        block_size: int | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        pack: bool = False,
        val_fraction: float = 0.1,
        seed: int = 1337,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        init_from: str | None = None,
    ) -> None:
        """Prompt/response examples to fine-tune on (docs/fine-tuning.md, "Teach it a task"): the loss is on the
        responses only, and the checkpoint records the template, which generate and evaluate then apply.

        Args:
            train_file: JSONL examples to train on: {instruction, input, output}, {prompt, completion} or
                {messages: [{role, content}, ...]}, one a line (see `format`).
            val_file: JSONL examples to validate on. Unset: a val_fraction share of train_file, drawn with a fixed
                seed.
            task: A built-in task instead of files: addition-2, addition-3, reverse-words (words of the corpus
                under data_dir) or reverse-words:PATH (words of your text). Its train, val and test problems never
                overlap; `evaluate` scores its test split.
            format: The files' format: instruction, completion or messages. auto: the first line's fields say.
            template: How an example becomes text: plain (`Q: ...` / `A: ...$`, characters that tiny Shakespeare's
                vocabulary holds) or chat (`<|user|>` ... `<|end|>`). Recorded in the checkpoint.
            train_on_prompt: Learn the prompts' tokens too. Off (the default): only the assistant's replies and
                their end markers are learned, and the prompt's tokens contribute nothing to the gradient.
            task_examples: Training examples drawn from a built-in task (at most its training split), and
                val_fraction times as many validation examples.
            tokenizer: Training from scratch: char (the data's own characters and the template's) or a BPE (gpt2,
                or a tokenizer.json). Unset: the `init_from` checkpoint's, else char. A character checkpoint whose
                vocabulary lacks characters of the data or the template is refused with the list (or grown).
            grow_vocab: Fine-tuning a character checkpoint whose vocabulary lacks characters of the data or the
                template: append them (sorted) to its vocabulary rather than refuse, so that every old id keeps
                its character, and give each an embedding row that starts as the mean of the old rows (an
                average token: `GPT.grow_vocab`). The checkpoints record the grown vocabulary. With full
                fine-tuning only: LoRA freezes the embedding. A BPE tokenizer has nothing to grow: it encodes
                any text.
            data_dir: Where the corpus is (tiny Shakespeare, downloaded once) for `task: reverse-words`.
            block_size: Context length in tokens: every example must fit in block_size + 1. Unset: the `init_from`
                checkpoint's, else the longest example's.
            batch_size: Examples per batch on each device, padded to the longest of them (or packed: `pack`).
            val_batch_size: Examples per validation batch. Unset: 4 x batch_size.
            pack: Pack each batch's examples several to a row of at most block_size tokens (first fit, the longest
                first, at the row width that pads least) instead of one example a row padded to the longest. An
                example still sees only itself, its positions counted from 0, so the loss is the same over fewer
                padded positions: setup prints their share, train/padding logs it. Validation batches too.
            val_fraction: The share of train_file held out for validation when there is no val_file.
            seed: Seed of the training order and of a built-in task's draws: batch i on rank r depends only on
                (seed, r, i), so a resumed run takes exactly the examples it would have taken.
            num_workers: DataLoader worker processes.
            pin_memory: Pin batches in page-locked memory, so that their copy to a GPU does not hold up the host.
                Unset: when training on CUDA.
            init_from: Set by the CLI: the checkpoint whose tokenizer and block size to use.
        """
        super().__init__()
        if (task is None) == (train_file is None):
            raise ValueError("give data.task (a built-in task) or data.train_file (JSONL examples), one of them.")
        if task is not None and val_file is not None:
            raise ValueError("a built-in task has its own validation split: drop data.val_file.")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size),
                            ("block_size", block_size), ("task_examples", task_examples)):  # fmt: skip
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}.")
        check_val_fraction(val_fraction)
        self.train_file, self.val_file, self.task, self.format = train_file, val_file, task, format
        self.template: Template = template_named(template)
        self.train_on_prompt, self.task_examples, self.data_dir = train_on_prompt, task_examples, data_dir
        self.batch_size, self.val_batch_size, self.pack = batch_size, val_batch_size or 4 * batch_size, pack
        self.val_fraction, self.seed = val_fraction, seed
        self.num_workers, self.pin_memory, self.init_from = num_workers, pin_memory, init_from
        self._source: ModelSource | None = None if init_from is None else open_source(init_from)
        if self._source is not None and tokenizer is not None:
            raise ValueError(f"data.tokenizer is {tokenizer}, but a fine-tune reads with the tokenizer of "
                             f"{init_from}: drop data.tokenizer.")  # fmt: skip
        self._bpe = None if tokenizer is None else tokenizer_from_spec(tokenizer)
        bpe = tokenizer if self._bpe is not None else None
        if self._source is not None and isinstance(self._source.tokenizer, BPETokenizer):
            bpe = f"{init_from}'s"
        if grow_vocab and bpe is not None:
            raise ValueError(f"data.grow_vocab adds characters to a character vocabulary, but the tokenizer ({bpe}) is "
                             "a byte-level BPE, which encodes any text (a character it has no token for is written as "
                             "its UTF-8 bytes): there is nothing to add, drop data.grow_vocab.")  # fmt: skip
        self.grow_vocab = grow_vocab
        self._block_size = block_size

    # -- the examples ------------------------------------------------------------------------------------------

    @cached_property
    def splits(self) -> dict[str, list[Example]]:
        """{"train": [...], "val": [...]}: read (or generated) once, by every process."""
        if self.task is not None:
            task = synthetic_task(self.task, self.data_dir)
            val = max(1, math.ceil(self.task_examples * self.val_fraction))
            return {"train": task.examples("train", self.task_examples, self.seed),
                    "val": task.examples("val", val, self.seed)}  # fmt: skip
        assert self.train_file is not None
        train = read_examples(self.train_file, self.format)
        if self.val_file is not None:
            return {"train": train, "val": read_examples(self.val_file, self.format)}
        if len(train) < 2:
            raise TaskDataError(f"{self.train_file} holds {len(train)} example: give two at least, or a data.val_file.")
        order = list(range(len(train)))
        random.Random(f"val/{self.seed}").shuffle(order)
        held = set(order[: max(1, round(len(train) * self.val_fraction))])
        return {"train": [e for i, e in enumerate(train) if i not in held],
                "val": [e for i, e in enumerate(train) if i in held]}  # fmt: skip

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's when fine-tuning (refused when it lacks characters of the data or template, or, with
        grow_vocab, with them appended); else a BPE's, or the characters of the data, the template and a built-in
        task's alphabet."""
        examples = [*self.splits["train"], *self.splits["val"]]
        if self._source is not None:
            tokenizer = self._source.tokenizer
            missing = missing_characters(tokenizer, self.template, examples)
            if missing and not self.grow_vocab:
                raise ValueError(self._refusal(tokenizer, missing))
            if missing:
                assert isinstance(tokenizer, CharTokenizer)  # a BPE lacks nothing
                grown = tokenizer.grown("".join(missing))
                added = grown.vocab[tokenizer.vocab_size :]
                rank_zero_info(f"data.grow_vocab: {len(added)} character(s) appended to the {tokenizer.vocab_size} "
                               f"of {self.init_from}, ids {tokenizer.vocab_size} on: {added!r}")  # fmt: skip
                return grown
            return tokenizer
        if self._bpe is not None:
            return self._bpe
        alphabet = synthetic_task(self.task, self.data_dir).alphabet if self.task is not None else ""
        text = [self.template.markers, alphabet, *(m.content for e in examples for m in e.messages)]
        return CharTokenizer.from_text("".join(text))

    def _refusal(self, tokenizer: Tokenizer, missing: dict[str, str]) -> str:
        shown = ", ".join(f"{char!r} ({where})" for char, where in list(missing.items())[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        return (
            f"{len(missing)} character(s) of the task data or the template {self.template.name} are not in the "
            f"{tokenizer.vocab_size}-character vocabulary of {self.init_from}, which has no embedding for them: "
            f"{shown}{more} (where each first occurs). Fine-tune from scratch instead (drop model.init_from: the "
            "vocabulary is then the data's), start from a BPE model such as gpt2, replace these characters, or set "
            "data.grow_vocab true to add them."
        )

    @cached_property
    def encoded(self) -> dict[str, list[Any]]:
        """Each split's examples as (inputs, targets) token pairs, every one checked to fit the block size."""
        tokenizer, template = self.tokenizer, self.template
        encoded = {split: [encode_example(tokenizer, template, e, self.train_on_prompt) for e in examples]
                   for split, examples in self.splits.items()}  # fmt: skip
        if self._source is None and self._block_size is None:
            return encoded  # the block size is the longest example's
        too_long = [(x.numel(), example.where) for split, pairs in encoded.items()
                    for (x, _), example in zip(pairs, self.splits[split], strict=True)
                    if x.numel() > self.block_size]  # fmt: skip
        if too_long:
            longest, where = max(too_long)
            raise TaskDataError(
                f"{len(too_long)} example(s) are longer than the block size of {self.block_size} tokens (the longest, "
                f"{where}, is {longest}). Shorten or drop them, or, training from scratch, raise data.block_size."
            )
        return encoded

    @property
    def block_size(self) -> int:
        """The context length, linked into the model."""
        if self._source is not None:
            return self._source.config_for({"data.block_size": self._block_size}).block_size
        if self._block_size is not None:
            return self._block_size
        return max(x.numel() for pairs in self.encoded.values() for x, _ in pairs)

    @property
    def vocab(self) -> str | dict[str, str]:
        """Linked into the model: the characters in id order, or a BPE tokenizer's state."""
        tokenizer = self.tokenizer
        return tokenizer.vocab if isinstance(tokenizer, CharTokenizer) else tokenizer.to_dict()

    def describe(self) -> dict[str, Any]:
        """What this module serves, for checkpoints."""
        files = {name: {"path": path, "sha256": sha256_of(Path(path))}
                 for name, path in (("train_file", self.train_file), ("val_file", self.val_file)) if path}  # fmt: skip
        return {"task": self.task, **files, "train_on_prompt": self.train_on_prompt,
                "examples": {split: len(examples) for split, examples in self.splits.items()}}  # fmt: skip

    # -- loaders -----------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        encoded = self.encoded
        lengths = [x.numel() for x, _ in encoded["train"]]
        padding = self.padding()
        layout = f"packed into rows of {self.block_size} tokens" if self.pack else "padded to their longest"
        rank_zero_info(f"task data: {len(encoded['train']):,} training and {len(encoded['val']):,} validation "
                       f"examples of {min(lengths)} to {max(lengths)} tokens (block size {self.block_size}), "
                       f"template {self.template.name}; batches of {self.batch_size} {layout}: {100 * padding:.1f}% of "
                       "their positions are padding (an epoch's)")  # fmt: skip

    def padding(self) -> float:
        """The share of padded positions in an epoch's training batches, all ranks' together (which are one
        process's first epoch: ExampleBatches), from the examples' lengths."""
        return self._train_batches().padding(math.ceil(len(self.encoded["train"]) / self.batch_size))

    def _train_batches(self, rank: int = 0, world: int = 1, start: int = 0) -> ExampleBatches:
        width = self.block_size if self.pack else None
        return ExampleBatches(self.encoded["train"], self.batch_size, self.seed, rank, world, start, width)

    def train_dataloader(self) -> ExampleBatches | DataLoader:
        rank, world, start = 0, 1, 0
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches  # where a resumed run was
        batches = self._train_batches(rank, world, start)
        pin = pin_memory_for(self.pin_memory, self.trainer)
        if self.num_workers == 0 and not pin:
            return batches
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, pin_memory=pin)

    def val_dataloader(self) -> DataLoader:
        pairs = self.encoded["val"]
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            # each example once, on one rank (Lightning's sampler would repeat some to even the shares out)
            if len(pairs) < self.trainer.world_size:
                raise ValueError(f"{len(pairs)} validation examples for {self.trainer.world_size} processes: add some.")
            sampler = UnrepeatedDistributedSampler(pairs, num_replicas=self.trainer.world_size,
                                                   rank=self.trainer.global_rank, shuffle=False)  # fmt: skip
        batch = partial(pack, width=self.block_size) if self.pack else collate
        pin = pin_memory_for(self.pin_memory, self.trainer)
        return DataLoader(pairs, batch_size=self.val_batch_size, sampler=sampler, collate_fn=batch,  # type: ignore[arg-type]
                          num_workers=self.num_workers, pin_memory=pin)  # fmt: skip
