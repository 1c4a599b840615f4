"""The LightningModule: wraps the plain GPT with a loss, metrics, the optimizer and its schedule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.utils import clip_grad_norm_
from torchmetrics import MeanMetric

from gpt_lightning.data.instruct import IGNORE_INDEX, TaskBatch, Template
from gpt_lightning.lora import LoRAConfig
from gpt_lightning.lora import summary as lora_summary
from gpt_lightning.model import CompileMode, compiled_forward
from gpt_lightning.optim import (
    MuonPrecision,
    OptimizerName,
    OptimizerSettings,
    clip_gradients,
    learning_rates,
    muon_note,
)
from gpt_lightning.sources import METADATA_KEY, build_network, metadata, open_source
from gpt_lightning.tokenizer import CharTokenizer, Tokenizer, tokenizer_from_dict
from gpt_lightning.training.nan_guard import NonFiniteLossGuard, is_logging_step
from gpt_lightning.training.seeded_dropout import SeededDropout
from gpt_lightning.training.tf32 import TF32Matmuls

# (inputs, targets) windows of text, or a TaskBatch of examples, padded or packed (inputs, targets, lengths, segments)
Batch = tuple[torch.Tensor, torch.Tensor] | TaskBatch


class GPTModule(L.LightningModule):
    def __init__(
        self,
        vocab: str | dict[str, str],
        block_size: int,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_embd: int | None = None,
        bias: bool | None = None,
        gelu: Literal["exact", "tanh"] | None = None,
        tie_embeddings: bool | None = None,
        vocab_size: int | None = None,
        vocab_multiple: int = 1,
        dropout: float = 0.0,
        init_from: str | None = None,
        lora: LoRAConfig = LoRAConfig(),  # noqa: B008 (a dataclass of settings: jsonargparse's nested options)
        learning_rate: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        optimizer: OptimizerName = "adamw",
        muon_learning_rate: float = 0.02,
        muon_momentum: float = 0.95,
        muon_precision: MuonPrecision = "auto",
        compile: bool | CompileMode = False,
        template: dict[str, str] | None = None,
    ) -> None:
        """A GPT trained with AdamW (or Muon and AdamW) and a warm-up + cosine LR schedule.

        Args:
            vocab: The tokenizer, linked from the data module: the characters of a character vocabulary in id
                order, or a BPE tokenizer's state ({type: bpe, tokenizer_json: ...}).
            block_size: Context length. Linked from the data module.
            n_layer: Transformer blocks. Unset: the `init_from` checkpoint's, else 6.
            n_head: Attention heads per block; must divide n_embd. Unset: the checkpoint's, else 6.
            n_embd: Width of the residual stream. Unset: the checkpoint's, else 384.
            bias: Biases in Linear and LayerNorm layers (GPT-2 has them). Unset: the checkpoint's, else False.
            gelu: The MLP's GELU: exact, or tanh (the approximation GPT-2's weights were trained with). Unset: the
                checkpoint's, else exact.
            tie_embeddings: The output head is the token embedding (GPT-2), or false, a matrix of its own (more
                parameters: vocabulary x n_embd). Unset: the checkpoint's, else true.
            vocab_size: Rows of the token embedding (and head), padded for speed, invisible outside: at least the
                tokenizer's tokens; more pads them to a round number, whose matmul GPUs run faster (e.g. 50304 for
                GPT-2's 50,257, as nanoGPT). The model still predicts the tokenizer's tokens only: logits, samples,
                exports and parameter counts leave the padding out. Unset: the checkpoint's, else the tokenizer's.
            vocab_multiple: With vocab_size unset, round those rows up to a multiple of this: 64 pads GPT-2's 50,257
                tokens to 50,304 (nanoGPT) and 65 characters to 128, whatever the tokenizer. 1: no rounding.
            dropout: Dropout probability in [0, 1). Not part of the architecture: a fine-tune may change it.
            init_from: Start from the weights, architecture and tokenizer of this checkpoint (fine-tuning): one of
                our .ckpt files, a Hugging Face GPT-2 folder, or a hub name (gpt2, gpt2-medium, gpt2-large,
                gpt2-xl). Steps, optimizer and schedule start fresh: this is not a resume (that is `--ckpt_path`).
                A LoRA fine-tune's updates are folded into its weights first. Ignored with `--ckpt_path`, whose
                checkpoint is then the only source.
            lora: Fine-tune with LoRA (rank > 0): the weights stay frozen and only low-rank updates of the
                chosen projections train, with AdamW. Rank 0: every weight trains (full fine-tuning).
            learning_rate: Peak AdamW learning rate, reached after the warm-up.
            min_lr: AdamW learning rate at the end of the cosine decay. Equal to learning_rate: a constant
                LR. Muon's decays by the same ratio, min_lr / learning_rate.
            warmup_steps: Optimizer steps of linear warm-up.
            lr_decay_steps: Step at which the cosine reaches min_lr. Unset: trainer.max_steps.
            weight_decay: Weight decay, applied to weight matrices and embeddings only (by Muon too).
            betas: AdamW betas. nanoGPT uses 0.99 for beta2 on small, noisy batches.
            optimizer: adamw: AdamW for every parameter (nanoGPT). muon: torch.optim.Muon for the 2-D
                weights inside the blocks, AdamW for the embeddings, the head, norms and biases;
                one schedule drives both.
            muon_learning_rate: Muon's peak learning rate (torch's "original" scaling: times
                sqrt(max(1, rows / cols)) per matrix). Used with optimizer=muon only.
            muon_momentum: Muon's (Nesterov) momentum. Used with optimizer=muon only.
            muon_precision: The precision of Muon's Newton-Schulz iteration. bf16 is torch.optim.Muon's own
                step; fp32 is the same update in float32, far faster on CPUs without native bfloat16 (AVX2).
                auto: bf16 on CUDA and on CPUs with AVX-512 BF16 or AMX, else fp32. The state is the same.
            compile: torch.compile the forward pass of training and validation: true (torch's default mode), or
                reduce-overhead, which adds CUDA graphs (a small model's GPU step is mostly kernel launches), or
                max-autotune (slow to compile). Sampling, export and the checkpoint's keys stay the plain
                network's. The first step pays the compilation; the fit prints how long it took.
            template: Linked from the data module: how task data's prompts became model input (instruct.Template's
                fields), recorded in checkpoints so that generate and evaluate apply it. None for plain text.
        """
        super().__init__()
        # A BPE tokenizer's JSON (1.3 MB for GPT-2's) stays out of hparams.yaml; the checkpoint keeps it.
        self.save_hyperparameters(ignore=["vocab", "lora"] if isinstance(vocab, dict) else ["lora"])
        self.lora = lora
        self.hparams["lora"] = dataclasses.asdict(lora)  # plain data: checkpoints load with weights_only=True
        self.optim = OptimizerSettings(optimizer, learning_rate, min_lr, warmup_steps, lr_decay_steps, weight_decay,
                                       (betas[0], betas[1]), muon_learning_rate, muon_momentum,
                                       muon_precision)  # fmt: skip
        self.template = None if template is None else Template.from_dict(template)
        self.tokenizer: Tokenizer = CharTokenizer(vocab) if isinstance(vocab, str) else tokenizer_from_dict(vocab)
        if lora.enabled and optimizer != "adamw":
            raise ValueError("LoRA trains its low-rank updates with AdamW: drop model.optimizer muon (or "
                             "model.lora.rank, to fine-tune every weight with Muon).")  # fmt: skip
        architecture = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "bias": bias, "gelu": gelu,
                        "tie_embeddings": tie_embeddings, "vocab_size": vocab_size}  # fmt: skip
        architecture["vocab_multiple"] = vocab_multiple
        # The checkpoint decides the architecture, vocabulary size and context (a GPT-2 may crop it).
        source = None if init_from is None else open_source(init_from)
        self.gpt = build_network(source, self.tokenizer, block_size, architecture, dropout, lora)
        self.config = self.gpt.config
        if lora.enabled:
            rank_zero_info(lora_summary(self.gpt, lora))
        if (padding := self.gpt.padding_summary()) is not None:
            rank_zero_info(padding)
        self.flops_per_token = self.gpt.flops_per_token()  # training FLOPs per token, for MFU
        self.compiled = compiled_forward(self.gpt, compile)  # training and validation's forward; None: eager
        # Characters each token stands for: val/bpc is in bits per character of text for every tokenizer. Not
        # a buffer: DDP would broadcast it at every step.
        self._characters_per_token = self.tokenizer.characters_per_token()
        self.val_loss = MeanMetric()
        self.val_bpc = MeanMetric()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)  # (B, T, vocab_size)

    def _logits(self, batch: Batch) -> torch.Tensor:
        segments = batch.segments if isinstance(batch, TaskBatch) else None  # examples packed into rows
        return (self.compiled or self.gpt)(batch[0], segments=segments)  # (B, T, V)

    def _loss(self, batch: Batch) -> torch.Tensor:
        """The mean loss over the batch's targets; a target of IGNORE_INDEX (a prompt's token, padding) is left
        out of the mean and of the gradient."""
        logits = self._logits(batch)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), ignore_index=IGNORE_INDEX)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if is_logging_step(self.trainer, self.global_step):  # self.log costs ~0.6 ms even when nothing is written
            # The mean over ranks (one all-reduce, on logging steps only), not rank 0's own batch. Not prog_bar:
            # Lightning would read it back after every later batch too (callbacks.LossProgressBar shows it).
            self.log("train/loss", loss, sync_dist=True)
            self.log_dict(learning_rates(self.optimizers().optimizer))  # type: ignore[union-attr]
            if isinstance(batch, TaskBatch):  # examples padded to the longest of their batch, or packed
                self.log("train/padding", 1.0 - batch.lengths.sum() / batch.inputs.numel(), sync_dist=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        y = batch[1].flatten()
        # (B * T,) in nats, 0 where the target is IGNORE_INDEX: only learned targets are scored
        losses = F.cross_entropy(self._logits(batch).flatten(0, 1), y, ignore_index=IGNORE_INDEX, reduction="none")
        # Windows and examples differ in count per batch and rank: the means are weighted by tokens and characters.
        if self._characters_per_token.device != y.device:
            self._characters_per_token = self._characters_per_token.to(y.device)
        scored = y != IGNORE_INDEX
        tokens = scored.sum()
        characters = (self._characters_per_token[y.clamp(min=0)] * scored).sum()
        self.val_loss.update(losses.sum() / tokens, tokens)
        self.val_bpc.update(losses.sum() / math.log(2) / characters, characters)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/bpc", self.val_bpc)

    def on_fit_start(self) -> None:
        # A `validate` before this fit (a zero-shot score, say) ran under inference mode and left the
        # metrics' states as inference tensors, which fit's validation may not update in place.
        self.val_loss.reset()
        self.val_bpc.reset()

    # -- optimization ---------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        schedule = self.optim.schedule(self.trainer.max_steps)
        # Fused AdamW unscales fp16 gradients inside its own step, so Lightning skips `scaler.unscale_`
        # for it: clipping and the logged grad norm would then see gradients times the loss scale.
        grad_scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = self.device.type == "cuda" and grad_scaler is None  # one kernel for all parameters
        if self.optim.name == "muon" and self._is_sharded():
            raise ValueError("model.optimizer muon needs whole matrices, which FSDP shards: use --model.optimizer "
                             "adamw with FSDP, or DDP (configs/trainer/ddp.yaml) with Muon.")  # fmt: skip
        optimizer = self.optim.build(self.gpt, fused)
        if (note := muon_note(optimizer)) is not None:
            rank_zero_info(note)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _is_sharded(self) -> bool:
        return isinstance(getattr(self.trainer, "strategy", None), FSDPStrategy)

    def on_train_start(self) -> None:
        # The scheduler state is restored by now (a resumed run's horizon is its checkpoint's).
        self.optim.restretch(self.lr_schedulers().lr_lambdas[0], self.global_step)  # type: ignore[union-attr]

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning has unscaled fp16 gradients before this hook (see configure_optimizers). Clipping goes straight
        # to torch: Lightning's mixed-precision plugin refuses to clip for a fused AdamW, which is only chosen where
        # there is no scaler, so nothing is left to unscale. Under FSDP each rank holds a shard of every gradient.
        clip_norm: Callable[[float], torch.Tensor] = partial(clip_grad_norm_, self.parameters())
        if self._is_sharded():
            clip_norm = self.trainer.strategy.model.clip_grad_norm_  # type: ignore[union-attr, assignment]
        norm = clip_gradients(self.parameters(), clip_norm, gradient_clip_val, gradient_clip_algorithm)
        if is_logging_step(self.trainer, self.global_step):  # before the step is taken
            self.log("train/grad_norm", norm)  # the same on every rank: gradients are all-reduced

    def configure_callbacks(self) -> list[L.Callback]:
        # Wherever this module trains, a NaN stops it, dropout draws what an uninterrupted run would, and a GPU
        # multiplies float32 on its tensor cores.
        return [NonFiniteLossGuard(), SeededDropout(), TF32Matmuls()]

    # -- checkpoints describe themselves ---------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        describe = getattr(getattr(self._trainer, "datamodule", None), "describe", None)
        data = describe() if callable(describe) else None  # what the run trains on, when a data module says
        checkpoint[METADATA_KEY] = metadata(self.config, self.tokenizer, data, self.lora, self.template)
