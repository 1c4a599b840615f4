"""Only what Lightning lacks: text samples and task scores in TensorBoard, last.ckpt on a step cadence and on
exit, a validation after the last step, token throughput, a TensorBoard logger without epochs, and a progress
bar that reads the loss on logging steps only."""

from __future__ import annotations

import pickle
import signal
import threading
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from gpt_lightning.commands.device import synchronize
from gpt_lightning.data.instruct import Template, render_prompt
from gpt_lightning.evaluation.run import resolve_task, score_task
from gpt_lightning.evaluation.scoring import encode_text
from gpt_lightning.evaluation.tasks import ChoiceItem, GenerationItem, GenerationTask, MultipleChoiceTask
from gpt_lightning.sampling import DEFAULT_SAMPLING, SamplingOptions, check_prompt, stream_text
from gpt_lightning.training.module import GPTModule
from gpt_lightning.training.nan_guard import is_logging_step
from gpt_lightning.training.task_datamodule import TaskDataModule


class TextSampleLogger(Callback):
    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        every_n_validations: int = 1,
        temperature: float = DEFAULT_SAMPLING.temperature,
        top_k: int | None = DEFAULT_SAMPLING.top_k,
        top_p: float | None = DEFAULT_SAMPLING.top_p,
        seed: int = DEFAULT_SAMPLING.seed,
    ) -> None:
        """Writes a sample of generated text to TensorBoard's Text tab after validation (rank 0 only).

        Args:
            prompt: Text the sample continues; every character must be in the vocabulary. A model fine-tuned on task
                data answers it in its template, up to its end marker.
            max_new_tokens: Characters to generate per sample (shorter than generate's: one sample per validation).
            every_n_validations: Sample after every n-th validation; 0 turns sampling off.
            temperature: Sampling temperature; 0 is greedy.
            top_k: Sample from the k most likely characters only; unset keeps all.
            top_p: Nucleus sampling: the smallest set of characters whose probability reaches p; unset keeps all.
            seed: Seed of the sampler, fixed so samples differ only because the model changed.
        """
        self.prompt = prompt
        self.options = SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed)  # fails at start, not later
        self.every_n_validations = every_n_validations
        self._validations = 0

    def setup(self, trainer: L.Trainer, pl_module: GPTModule, stage: str) -> None:  # type: ignore[override]
        if self.every_n_validations > 0 and isinstance(trainer.strategy, FSDPStrategy):
            # Rank 0 alone cannot run a sharded model: every rank would have to gather each layer's weights.
            rank_zero_warn("sampling during training is off under FSDP: sample the checkpoint with `generate`.")
            self.every_n_validations = 0
        self._text = render_prompt(pl_module.template, self.prompt)
        self._stop = () if pl_module.template is None else (pl_module.template.end,)
        if self.every_n_validations > 0:
            check_prompt(pl_module.tokenizer, self._text, what="sample.prompt")  # fail now, not at the first sample

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: GPTModule) -> None:  # type: ignore[override]
        if trainer.sanity_checking or self.every_n_validations <= 0:
            return
        self._validations += 1
        if self._validations % self.every_n_validations:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        with trainer.precision_plugin.forward_context():
            sampled = stream_text(pl_module.gpt, pl_module.tokenizer, self._text, self.options, stop=self._stop)
            text = self._text + "".join(sampled)
        # Indented by four spaces, TensorBoard's Markdown shows the text verbatim, line breaks included.
        markdown = "\n".join("    " + line for line in text.split("\n"))
        for logger in loggers:
            logger.experiment.add_text("samples", markdown, global_step=trainer.global_step)


class TaskScores(Callback):
    def __init__(
        self,
        tasks: list[str] | None = None,
        limit: int | None = 200,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        data_dir: str = "data",
        seed: int = 1337,
        data_task: bool = True,
    ) -> None:
        """Scores tasks at every validation and logs `val/<task>/<metric>` (acc, acc_norm, exact_match, ...)
        next to val/loss, as `evaluate` scores them (docs/evaluation.md). Under DDP each process scores its share
        of the items.

        Args:
            tasks: Built-in task names (spelling, next-word, next-line, who-speaks; addition-2, addition-3,
                reverse-words[:PATH], whose test problems a fine-tune on the task never trains on) or
                multiple-choice and generation task files. Unset: none (no cost). Text for bits per byte is
                val/loss's job already. A model fine-tuned on task data reads generation prompts in its template.
            limit: Score the first `limit` items of each task (all: null). 200 items give a standard error of
                about 3 points of accuracy, at a cost near a validation's on the CPU recipe.
            batch_size: Choices per forward pass.
            max_new_tokens: The most tokens a generation item decodes.
            data_dir: The folder that holds tinyshakespeare/input.txt, for the built-in tasks (linked from the
                data's data_dir).
            seed: Seed of the built-in tasks' items.
            data_task: Score the built-in task that the data trains on (TaskDataModule's `task`) as well, on its
                held-out test problems: a fine-tune on reverse-words:PATH is scored on the words of PATH.
        """
        self.specs = list(tasks or [])
        self.limit, self.batch_size, self.max_new_tokens = limit, batch_size, max_new_tokens
        self.data_dir, self.seed, self.data_task = data_dir, seed, data_task
        self.tasks: list[MultipleChoiceTask | GenerationTask] = []

    def setup(self, trainer: L.Trainer, pl_module: GPTModule, stage: str) -> None:  # type: ignore[override]
        specs = list(self.specs)
        data = getattr(trainer, "datamodule", None)  # a property Lightning sets up at fit, untyped
        if self.data_task and isinstance(data, TaskDataModule) and data.task is not None and data.task not in specs:
            specs.insert(0, data.task)
        self.tasks = []
        if not specs:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            rank_zero_warn("task scores during training are off under FSDP: score the checkpoint with `evaluate`.")
            return
        for spec in specs:  # every item checked now, not at the first validation
            task = resolve_task(spec, self.data_dir, self.seed)
            if not isinstance(task, MultipleChoiceTask | GenerationTask):
                raise ValueError(
                    f"task_scores.tasks: {spec} is text for language modelling, which val/loss scores already: "
                    "give multiple-choice or generation tasks, or score the text with `evaluate`."
                )
            for item in task.items[: self.limit]:
                for text, what in _texts_of(item, pl_module.template):
                    encode_text(pl_module.tokenizer, text, f"task_scores.tasks: {what}")
            self.tasks.append(task)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: GPTModule) -> None:  # type: ignore[override]
        if trainer.sanity_checking:
            return
        for task in self.tasks:
            with trainer.precision_plugin.forward_context():
                metrics = score_task(pl_module.gpt, pl_module.tokenizer, task, self.limit, self.batch_size,
                                     self.max_new_tokens, template=pl_module.template)  # fmt: skip
            for metric in metrics:
                # Every process holds the same value (score_task gathers the items); syncing averages equals.
                pl_module.log(f"val/{task.name}/{metric.name}", metric.value, sync_dist=True)


def _texts_of(item: ChoiceItem | GenerationItem, template: Template | None) -> list[tuple[str, str]]:
    if isinstance(item, ChoiceItem):
        return [(item.context, f"{item.where}: the context")] + [
            (item.delimiter + choice, f"{item.where}: choice {i}") for i, choice in enumerate(item.choices)
        ]
    return [(render_prompt(template, item.prompt), f"{item.where}: the prompt")]


class StepTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger without the `epoch` scalar, which Lightning adds to every step's
    metrics: the training stream is endless, so the epoch is always 0, and its chart would be the first
    one TensorBoard shows. The metrics of one step can be written through to disk as they are logged
    (`write_through_step`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_through_step: int | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)
        if step is not None and step == self.write_through_step:
            self.save()


class LossProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with train/loss as of the latest logging step.

    A metric logged with prog_bar=True is turned into a float by Lightning after every batch, whether it was
    logged at that step or not: on a GPU a host-device sync per step, which keeps the host from queueing
    kernels ahead (tests/unit/test_host_syncs.py). This bar reads the logged loss once per logging step instead."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        """
        Args:
            refresh_rate: Redraw the bar every n batches; 0 turns it off.
            process_position: Line offset of the bar, for several trainings at once.
            leave: Keep the bar of each finished epoch on screen.
        """
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._loss: float | None = None
        self._read_at_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._read_at_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step  # the optimizer steps done: the last micro-batch of a step has taken it
        if step > self._read_at_step and is_logging_step(trainer, step - 1):
            self._read_at_step = step
            loss = trainer.callback_metrics.get("train/loss")
            self._loss = None if loss is None else float(loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict]:
        metrics = super().get_metrics(trainer, pl_module)
        return metrics if self._loss is None else {"train/loss": self._loss, **metrics}


class LossChartLayout(Callback):
    """Adds a TensorBoard "Custom Scalars" chart with train and validation loss on one plot."""

    LAYOUT = {"loss": {"train and validation": ["Multiline", ["train/loss", "val/loss"]]}}

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(self.LAYOUT)


class LastCheckpoint(Callback):
    def __init__(self, every_n_train_steps: int = 100) -> None:
        """Keeps `last.ckpt` beside the best checkpoint, with everything needed to resume exactly.

        It is written every n optimizer steps, when training ends, and when SIGTERM or Ctrl-C stops it,
        so a crash loses at most n steps. A stop always saves at the end of an optimizer step: one that
        arrives between the micro-batches of a gradient-accumulation window lets the window finish
        first (a partial window's gradients are in no checkpoint). A second Ctrl-C stops at once and
        keeps the previous `last.ckpt`. Other exceptions save nothing: the state that raised them is not
        worth resuming from. Lightning writes to a temporary file and renames it, so a kill during the
        write leaves the previous `last.ckpt` intact.

        Args:
            every_n_train_steps: Optimizer steps between saves; 0 saves only at the end and on stop.
        """
        if every_n_train_steps < 0:
            raise ValueError(f"last_checkpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}.")
        self.every_n_train_steps = every_n_train_steps
        self.last_path: Path | None = None
        self._saved_at_step = -1
        self._flush_pending = False
        self._step_at_batch_start = -1
        self._stop_requested = False  # by SIGTERM or Ctrl-C: stop at the end of the current optimizer step
        self._validated_at_step = -1
        self._previous_handlers: dict[int, Any] = {}

    def _save(self, trainer: L.Trainer) -> None:
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
            return
        if trainer.global_step == self._saved_at_step:
            return
        # TensorBoard buffers events: flush them with every checkpoint, or a kill after the save would lose
        # logged steps that the resumed run never logs again.
        self._flush_logs(trainer)
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)
        self.last_path, self._saved_at_step = path, trainer.global_step
        # Lightning logs this step's metrics after on_train_batch_end, so after this save: write them through
        # to disk as soon as they are logged (a kill before the next flush would lose a step the resumed run
        # never logs again), and flush every logger first thing in the next batch.
        for logger in trainer.loggers:
            if isinstance(logger, StepTensorBoardLogger):  # the optimizer step that just ended, as logged
                logger.write_through_step = trainer.global_step - 1
        self._flush_pending = True

    @staticmethod
    def _flush_logs(trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed at its last step (preempted after its final save) trains nothing: the last.ckpt it
        # was resumed from already holds this step, and saving it again from a loop that never ran would
        # shift the step counters of the next resume by one.
        self._saved_at_step = trainer.global_step
        self._stop_requested = False
        # Lightning's SIGTERM handler sets a flag that stops the run after whatever micro-batch is running,
        # on each rank by itself, and broadcasts inside the handler (Lightning issue #20806). Ours only
        # records the request; the ranks act on it together at the end of an optimizer step.
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {
                signum: signal.signal(signum, partial(self._on_signal, trainer))
                for signum in (signal.SIGTERM, signal.SIGINT)
            }

    def _on_signal(self, trainer: L.Trainer, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self._stop_requested:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            rank_zero_info("Ctrl-C: stopping at the end of this step and saving last.ckpt (Ctrl-C again: stop now).")
        elif not self._stop_requested and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # pass it on to the processes this one started, as Lightning does
        self._stop_requested = True

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        self._step_at_batch_start = trainer.global_step
        # Lightning logs a step's metrics after its on_train_batch_end: flush them (for loggers that cannot
        # write through) first thing in the next batch, so the log holds every step before the checkpoint.
        if self._flush_pending:
            self._flush_logs(trainer)
            self._flush_pending = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step == self._step_at_batch_start:
            # Inside a gradient-accumulation window. A stop here would save Lightning's micro-batch counter
            # past the window's start, with the window's gradients lost: the resumed run would step early
            # once and shift every later window.
            return
        # One all-reduce of a flag per optimizer step under DDP, so that every rank stops after the same
        # step, whichever of them got the signal, and when.
        if trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False):
            trainer._signal_connector.received_sigterm = True  # Lightning stops right after this hook
        periodic = self.every_n_train_steps and step % self.every_n_train_steps == 0
        # The last step is saved here too, like any other, rather than at on_train_end: after a validation
        # at that same step, Lightning reads the loop state of an end-of-training save as saved
        # mid-step, and a resumed run would log every step one too far.
        if periodic or 0 < trainer.max_steps <= step:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_at_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_signal_handlers()
        if self.last_path is not None and self._validated_at_step == self._saved_at_step == trainer.global_step:
            self._record_final_validation(trainer, self.last_path)
        self._save(trainer)

    @staticmethod
    def _record_final_validation(trainer: L.Trainer, path: Path) -> None:
        """The final last.ckpt was written before the final validation (see on_train_batch_end). Its best
        checkpoint is put into it now, and nothing else: otherwise a resumed run would not know that file,
        and a better score later would leave two best checkpoints."""
        if trainer.is_global_zero:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:  # a user callback's state that is not plain data
                reason = str(err).strip().splitlines()[0][:60]
                rank_zero_warn(f"{path} keeps the best checkpoint it was saved with: reading it back failed ({reason})")
            else:
                states = {cb.state_key: cb.state_dict() for cb in trainer.checkpoint_callbacks}
                checkpoint["callbacks"].update(states)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)  # atomic: temp file, rename
        trainer.strategy.barrier("last.ckpt")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_signal_handlers()
        if isinstance(exception, SIGTERMException):  # raised by Lightning after a step, on every rank at once
            self._save(trainer)
            rank_zero_info(f"Saved {self.last_path} at step {trainer.global_step}: resume with --ckpt_path last")
        elif isinstance(exception, KeyboardInterrupt):
            # Raised wherever the program was, an optimizer step included: this state may be torn.
            kept = f"{self.last_path} (step {self._saved_at_step})" if self.last_path else "no last.ckpt"
            rank_zero_info(f"Stopped at once: nothing saved, {kept} is kept.")


class FinalValidation(Callback):
    """Validates after the last step too, so every run ends with a val/loss (and a best checkpoint), and keeps
    the latest validation's step and scores (`latest`) for the summary that ends `fit`.

    Lightning validates at `val_check_interval` only; asking it to stop at max_steps makes it run the
    validation it runs before any early stop."""

    def __init__(self) -> None:
        self.latest: tuple[int, dict[str, float]] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.latest = (trainer.global_step, scores)


COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                  "16-true": torch.float16, "64-true": torch.float64}  # fmt: skip


class TokenThroughput(Callback):
    """Logs training tokens per second (`train/tokens_per_sec`, all devices together) at each logging
    step, and `train/mfu` where Lightning knows the device's peak FLOPs (GPUs): achieved FLOPs, from the
    module's `flops_per_token`, over the device's real peak for the run's precision.

    Lightning's ThroughputMonitor synchronizes the GPU after every step to time it, which stalls the
    queue of kernels; this one counts tokens on the host (batch shapes need no sync) and synchronizes
    only when it logs. Validation time is left out."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dtype = COMPUTE_DTYPES.get(str(trainer.precision), torch.float32)
        self.peak_flops = peak_flops(pl_module.device, dtype)
        self._logged_at_step = trainer.global_step  # log only once an optimizer step has completed
        self._compiling = getattr(pl_module, "compiled", None) is not None  # the first batch compiles
        self._restart(pl_module)

    def _restart(self, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._start, self._tokens, self._flops = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: GPTModule, outputs: Any, batch: Any, *_: Any) -> None:  # type: ignore[override]
        if self._compiling:
            self._compiling = False
            synchronize(pl_module.device)  # once: the end of the first batch, whose forward and backward compile
            seconds = time.perf_counter() - self._start
            rank_zero_info(f"torch.compile: compiled in {seconds:.1f} s (the first training batch, compilation "
                           "included; train/tokens_per_sec counts from the next)")  # fmt: skip
            self._restart(pl_module)
            return
        tokens = batch[0].numel()
        self._tokens += tokens
        self._flops += pl_module.flops_per_token * tokens
        # Optimizer steps so far: with gradient accumulation, several batches share one, and only the
        # last of them (the one that stepped) ends the step.
        step = trainer.global_step
        if step == self._logged_at_step or not is_logging_step(trainer, step - 1):
            return
        self._logged_at_step = step
        synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._start
        metrics = {"train/tokens_per_sec": self._tokens * trainer.world_size / elapsed}
        if self.peak_flops:
            metrics["train/mfu"] = self._flops / elapsed / self.peak_flops
        # Straight to the loggers, as Lightning's own LearningRateMonitor and ThroughputMonitor do: through
        # self.log each metric would cost about 0.6 ms of bookkeeping. `step - 1` is the step under which
        # Lightning writes the same batch's self.log metrics (train/loss).
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)
        self._restart(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._restart(pl_module)  # the next window starts after validation


# Lightning 2.6.6 knows the H200 only by the names "H200 SXM1" and "H200 NVL1"; CUDA calls the SXM card
# "NVIDIA H200". Its tensor cores and clocks are the H100 SXM's: NVIDIA's datasheets give both 989 TFLOP/s of
# dense bf16/fp16 (Lightning's own "h200 sxm1" entry holds the 2x figures that assume sparsity).
_DENSE_PEAK_FLOPS: dict[str, dict[torch.dtype | str, float]] = {
    "nvidia h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12}
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for `dtype`, as Lightning knows it, or from the table above."""
    flops: float | None = get_available_flops(device, dtype)
    if flops is None and device.type == "cuda":
        table = _DENSE_PEAK_FLOPS.get(torch.cuda.get_device_name(device).lower(), {})
        tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
        flops = table.get("tfloat32" if tf32 else dtype)
    return flops
