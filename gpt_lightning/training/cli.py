"""The command line: LightningCLI with our links, resume handling and clean errors."""

from __future__ import annotations

import inspect
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_module
from tqdm import tqdm

from gpt_lightning.commands import COMMANDS
from gpt_lightning.data.instruct import Template
from gpt_lightning.sources import open_source
from gpt_lightning.training.callbacks import (
    FinalValidation,
    LastCheckpoint,
    LossChartLayout,
    LossProgressBar,
    TaskScores,
    TextSampleLogger,
    TokenThroughput,
)
from gpt_lightning.training.datamodule import TextDataModule
from gpt_lightning.training.module import GPTModule
from gpt_lightning.training.nan_guard import NonFiniteLossError

TENSORBOARD_LOGGER = "gpt_lightning.training.callbacks.StepTensorBoardLogger"
# Loggers whose runs live in <save_dir>/<name>/version_N, where a resumed run continues.
TENSORBOARD_LOGGERS = (TENSORBOARD_LOGGER, "lightning.pytorch.loggers.TensorBoardLogger")


# Every callback of fit and validate, in one place. Those with options get a section of the config, named
# here (--checkpoint.*, ...): `checkpoint` keeps the best model by validation loss, saved after each
# validation; `last_checkpoint` owns last.ckpt, the one to resume from.
CALLBACK_SECTIONS: dict[str, type[Callback]] = {
    "checkpoint": ModelCheckpoint,
    "last_checkpoint": LastCheckpoint,
    "sample": TextSampleLogger,
    "task_scores": TaskScores,
    "progress_bar": LossProgressBar,
}


def always_on_callbacks() -> list[Callback]:
    """The callbacks without options, in every fit and validate."""
    return [FinalValidation(), LossChartLayout(), TokenThroughput()]


class GPTLightningCLI(LightningCLI):
    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(
            GPTModule,
            # --data names the data module by class: TextDataModule (text, the default) or TaskDataModule
            # (prompt/response examples, configs/finetune_task.yaml)
            L.LightningDataModule,
            subclass_mode_data=True,
            # A fixed default seed: a resumed run must draw the same data and dropout as the original.
            seed_everything_default=1337,
            # configure_optimizers is the module's own (AdamW groups, warm-up + cosine).
            auto_configure_optimizers=False,
            trainer_defaults={
                "logger": {
                    "class_path": TENSORBOARD_LOGGER,
                    "init_args": {"save_dir": "runs", "name": "gpt", "default_hp_metric": False},
                },
                "callbacks": always_on_callbacks(),
                "check_val_every_n_epoch": None,  # the training stream is endless: validate by steps
                "gradient_clip_val": 1.0,
            },
            args=args,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test and predict have nothing to run on: the data has two splits, and text comes from `generate`.
        lightning = LightningCLI.subcommands()
        return {"fit": lightning["fit"], "validate": lightning["validate"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for section, callback in CALLBACK_SECTIONS.items():
            parser.add_lightning_class_args(callback, section)
        # Redrawing the bar (and reading the loss for it) every step costs 3% of a CPU-recipe step.
        parser.set_defaults({"progress_bar.refresh_rate": 10})
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.filename": "best-{step}"})
        parser.set_defaults({"data": {"class_path": f"{TextDataModule.__module__}.TextDataModule"}})
        # Fine-tuning takes vocabulary and block size from the same checkpoint as the weights.
        parser.link_arguments("model.init_from", "data.init_args.init_from", apply_on="parse")
        parser.link_arguments("data.init_args.data_dir", "task_scores.data_dir", apply_on="parse")
        # Derived from the data, written once.
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.block_size", apply_on="instantiate")
        parser.link_arguments("data.template", "model.template", compute_fn=_template_state, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # Private LightningCLI calls (_get, _parser, _instantiate_trainer): it has no public way to leave out a
        # configured callback, which validate (no checkpoints) and a run without a progress bar need.
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        keys = list(CALLBACK_SECTIONS)
        if config.get("enable_progress_bar") is False:
            # Cluster jobs turn the bar off to keep tqdm out of their logs; Lightning refuses a bar then.
            keys = [key for key in keys if key != "progress_bar"]
        if self.subcommand == "validate":
            # Scoring a checkpoint prints its scores and writes nothing: no run folder (a new version beside the
            # checkpoint's own run, with a copy of the config), no checkpoints. The checkpoint callbacks would
            # also read the saved run's state, and warn that its folder is not theirs.
            config.update(logger=False, enable_checkpointing=False)
            keys = [key for key in keys if key not in ("checkpoint", "last_checkpoint")]
            self.save_config_callback = None
        return self._instantiate_trainer(config, [self._get(self.config_init, key) for key in keys])

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI then parses a checkpoint's saved hyperparameters over the command line whenever ckpt_path
        # names a file, with no switch to turn it off. Ours describe themselves (see `_prepare_resume`), and what
        # the user passes must win (a resumed run may raise max_steps): the path waits outside the config.
        subcommand = self.config.get("subcommand")
        self._ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if self._ckpt_path is not None:
            self.config[subcommand].ckpt_path = None

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:  # built, not run (run=False): the caller fits
            return
        config = self.config[self.subcommand]
        config.ckpt_path = self._ckpt_path
        if config.get("weights_only") is None:
            config.weights_only = True  # our checkpoints hold tensors and plain types only: never unpickle code
        if self.subcommand == "fit":
            self._prepare_resume(config)
        elif config.get("ckpt_path"):
            self._take_model_from(config, _existing_checkpoint(config.ckpt_path))

    @staticmethod
    def _take_model_from(config: Namespace, ckpt: Path) -> None:
        """A resumed or validated checkpoint is the run's only source: it defines the architecture, vocabulary
        and block size (the recipe's settings for them are replaced: they usually come from a config file,
        not from the user), the weights come from its full state, and the recipe's init_from is not read."""
        source = open_source(ckpt)
        config.ckpt_path = str(ckpt)
        if config.model.get("init_from") is not None:
            rank_zero_info(f"--ckpt_path {ckpt} is the run's only source: model.init_from {config.model.init_from} "
                           "is ignored")  # fmt: skip
            config.model.init_from = None
        data = config.data.init_args
        data.init_from = str(ckpt)  # its vocabulary and block size
        settings, replaced = source.settings_replacing(config.model, data.get("block_size"))
        for option, value in settings.items():
            config.model[option] = Namespace(**value) if option == "lora" else value
        data.block_size = None
        if replaced:
            rank_zero_info(f"{ckpt} defines the architecture: {', '.join(replaced)}")

    def _prepare_resume(self, config: Namespace) -> None:
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        logger = config.trainer.get("logger")
        run_root = None
        if isinstance(logger, Namespace) and logger.get("class_path") in TENSORBOARD_LOGGERS:
            run_root = Path(logger.init_args.save_dir) / logger.init_args.name
        if ckpt_path == "last":
            candidates = (
                sorted(run_root.glob("version_*/checkpoints/last.ckpt"), key=os.path.getmtime) if run_root else []
            )
            if not candidates:
                raise FileNotFoundError(
                    f"--ckpt_path last: no last.ckpt under {run_root or 'the logger folder'}/*/checkpoints/. "
                    "Check trainer.logger's save_dir and name, or start a new run without --ckpt_path."
                )
            ckpt = candidates[-1]
        else:
            ckpt = _existing_checkpoint(ckpt_path)
        facts = open_source(ckpt)
        if facts.optimizer != config.model.optimizer:
            raise ValueError(
                f"{ckpt} was trained with model.optimizer={facts.optimizer}, and its optimizer state fits no other: "
                f"resume with --model.optimizer {facts.optimizer} (or start a new run from its weights with "
                "--model.init_from)."
            )
        if not facts.resumable:
            raise ValueError(
                f"{ckpt} holds no training state (an export: weights and description only), so there is no run to "
                f"resume: start one from it with --model.init_from {ckpt}, or validate it with --ckpt_path."
            )
        self._take_model_from(config, ckpt)
        # Continue logging in the checkpoint's own run folder, hiding events the crash left past it. Paths
        # are compared resolved: `runs/...`, `./runs/...`, an absolute path and a symlink are one folder.
        run_dir = ckpt.resolve().parent.parent
        if (
            run_root is not None
            and ckpt.resolve().parent.name == "checkpoints"
            and run_dir.parent == run_root.resolve()
        ):
            step = facts.global_step
            logger.init_args.version = run_dir.name
            logger.init_args.purge_step = step
            # A job preempted twice before its next last.ckpt resumes from the same step twice: keep
            # every resume's config, numbered, rather than refuse to start or overwrite one.
            self.save_config_kwargs["config_filename"] = _unused_name(
                run_dir, f"config.resumed-at-step-{step}", ".yaml"
            )

    def before_fit(self) -> None:
        # A new run from weights (a fine-tune) measures its overlap with the checkpoint's training split:
        # one pass over the text, on the process that prints the warning.
        warn_of_overlap = getattr(self.datamodule, "warn_of_overlap", None)  # text's: task data has no split to overlap
        if self.config.fit.model.init_from is not None and self.trainer.is_global_zero and warn_of_overlap:
            warn_of_overlap()

    def before_validate(self) -> None:
        # Validation reads the checkpoint's weights; the training callbacks it saved have nothing to restore.
        # (main's clean_console restores the warning filters afterwards.)
        warnings.filterwarnings("ignore", "Be aware that when using `ckpt_path`, callbacks used to create")

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer), file=sys.stderr)


def _template_state(template: Template | None) -> dict[str, str] | None:
    return None if template is None else template.to_dict()


def fit_summary(trainer: L.Trainer) -> str:
    """Where a finished fit left its run, how it scored, and the commands that sample it and show its curves."""
    callbacks: list[Any] = getattr(trainer, "callbacks", [])  # set in Trainer.__init__, untyped there
    run = trainer.logger.log_dir if trainer.logger is not None else None
    lines = [f"Finished at step {trainer.global_step}." + (f" Run folder: {run}" if run else "")]
    checkpoint = trainer.checkpoint_callback
    last = next((cb.last_path for cb in callbacks if isinstance(cb, LastCheckpoint)), None)
    if last is None and isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:  # a resume that trained nothing
        last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    if last is not None and last.is_file():
        lines.append(f"  last.ckpt       {last}")
    best = None
    if isinstance(checkpoint, ModelCheckpoint) and Path(checkpoint.best_model_path or "").is_file():
        best, score = checkpoint.best_model_path, checkpoint.best_model_score
        scored = f" ({checkpoint.monitor} {float(score):.4f})" if checkpoint.monitor and score is not None else ""
        lines.append(f"  best            {best}{scored}")
    latest = next((cb.latest for cb in callbacks if isinstance(cb, FinalValidation)), None)
    if latest is not None and "val/loss" in latest[1]:
        step, scores = latest
        limit = trainer.limit_val_batches
        whole = isinstance(limit, float) and limit == 1.0  # an int is a number of batches: 1 is one batch
        split = "the whole validation split" if whole else f"trainer.limit_val_batches={limit}"
        bpc = f", val/bpc {scores['val/bpc']:.4f}" if "val/bpc" in scores else ""
        lines.append(f"  validation      val/loss {scores['val/loss']:.4f}{bpc} (at step {step}, {split})")
    sample = best or (str(last) if last is not None and last.is_file() else None)
    if sample is not None:
        lines.append(f"  sample it       python main.py generate --ckpt_path {shlex.quote(sample)}")
    if run is not None and isinstance(trainer.logger, TensorBoardLogger):
        lines.append(f"  see its curves  tensorboard --logdir {shlex.quote(run)}")
    return "\n".join(lines)


def _unused_name(folder: Path, stem: str, suffix: str) -> str:
    """`stem + suffix`, or `stem.2 + suffix`, `stem.3 + suffix`, ...: the first name not taken in folder."""
    name, n = stem + suffix, 1
    while (folder / name).exists():
        n += 1
        name = f"{stem}.{n}{suffix}"
    return name


def _existing_checkpoint(path: str) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path {path} does not exist: give a .ckpt file (or `last` to resume).")
    return Path(path)


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, TimeoutError, NonFiniteLossError,
               MisconfigurationException)  # fmt: skip


# Lines Lightning prints on every run that tell a user nothing: advertisements for its cloud services, and
# whether a GPU or TPU exists (one that exists and goes unused still gets Lightning's warning).
NOISE = ("💡 Tip:", "GPU available: ", "TPU available: ")


class _LeaveOutNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


class _AboveTheBar(logging.Handler):
    """Writes each message through tqdm, which clears the progress bar, writes the line and draws the bar again
    below it: a message never lands glued to the end of the bar. To the sys.stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _console_handler_above(logger: logging.Logger) -> bool:
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    parent = logger.parent if logger.propagate else None
    while parent is not None:
        if any(isinstance(h, logging.StreamHandler) and h.stream in consoles for h in parent.handlers):
            return True
        parent = parent.parent if parent.propagate else None
    return False


@contextmanager
def clean_console() -> Iterator[None]:
    """Lightning's messages and the package's own (a token cache being built) on stderr, each on its own line
    above the progress bar, without the lines that tell a user nothing (`NOISE`)."""
    handler, noise = _AboveTheBar(), _LeaveOutNoise()
    swapped: list[tuple[logging.Logger, list[logging.Handler]]] = []
    for name in ("lightning.pytorch", "lightning.fabric", "gpt_lightning"):
        logger = logging.getLogger(name)
        # Lightning gives its loggers a plain StreamHandler when the root logger has none: ours replaces it. Where
        # the messages go on to the root logger, ours is added unless a handler there writes to the console.
        plain = [h for h in logger.handlers if type(h) is logging.StreamHandler]
        if plain or not (logger.handlers or _console_handler_above(logger)):
            swapped.append((logger, logger.handlers))
            logger.handlers = [h for h in logger.handlers if h not in plain] + [handler]
    package_log = logging.getLogger("gpt_lightning")
    package_level = package_log.level
    if package_level == logging.NOTSET:
        package_log.setLevel(logging.INFO)
    rank_zero_module.log.addFilter(noise)  # the logger of Lightning's rank_zero_info
    try:
        with warnings.catch_warnings():
            # Lightning 2.6.6 calling an API that torch 2.13 deprecates: nothing a user can act on.
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            yield
    finally:
        rank_zero_module.log.removeFilter(noise)
        package_log.setLevel(package_level)
        for logger, handlers in swapped:
            logger.handlers = handlers


# fit and validate are LightningCLI's (GPTLightningCLI above); every other command is a plain function in
# gpt_lightning.commands, with a parser made from its signature. The first argument names the command.
LIGHTNING_COMMANDS = {
    "fit": "Train a model: pre-train, fine-tune from weights (--model.init_from) or resume (--ckpt_path).",
    "validate": "Score a checkpoint on the validation split (--ckpt_path) and print its loss.",
}


def command_parser() -> ArgumentParser:
    """The parser of the commands in COMMANDS. fit and validate are listed for --help only: their options are
    LightningCLI's (`python main.py fit --help`)."""
    parser = ArgumentParser(prog="main.py", description="gpt-lightning: train, sample, export, serve and evaluate "
                            "GPT models. `python main.py COMMAND --help` lists a command's options.")  # fmt: skip
    commands = parser.add_subcommands(required=True)
    for name, help in LIGHTNING_COMMANDS.items():
        commands.add_subcommand(name, ArgumentParser(description=help), help=help)
    _add_commands(commands, COMMANDS)
    return parser


def _add_commands(subcommands: Any, table: dict[str, Any]) -> None:
    for name, command in table.items():
        if name == "_help":
            continue
        doc = command["_help"] if isinstance(command, dict) else inspect.getdoc(command) or ""
        description = doc.split("\n\n")[0]
        help = description.split(". ")[0].rstrip(".") + "."  # its first sentence, in the list of commands
        parser = ArgumentParser(description=description)
        subcommands.add_subcommand(name, parser, help=help)  # before its own subcommands: jsonargparse's order
        if isinstance(command, dict):
            _add_commands(parser.add_subcommands(required=True), command)
        else:
            parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of options, as --print_config "
                                "writes them; options after it override it.")  # fmt: skip
            parser.add_function_arguments(command, as_group=False, sub_configs=True)


def run_command(args: list[str]) -> Any:
    """Parses `args` (a command of COMMANDS and its options) and calls the command's function."""
    parser = command_parser()
    config = parser.instantiate_classes(parser.parse_args(args))
    command: Any = COMMANDS
    while isinstance(command, dict):
        name = config.pop("subcommand")
        command, config = command[name], config[name]
    config.pop("config", None)
    return command(**config)


def main(args: list[str] | None = None) -> None:
    # A bare --print_config prints the config documented: every option with its help as a comment.
    documented = ["--print_config=comments" if arg == "--print_config" else arg for arg in args or sys.argv[1:]]
    if args is None:
        sys.argv[1:] = documented  # in place: DDP re-launches sys.argv
    try:
        with clean_console():
            if documented[:1] and documented[0] in LIGHTNING_COMMANDS:
                GPTLightningCLI(args=None if args is None else documented)
            else:
                run_command(documented)
    except USER_ERRORS as err:
        if os.environ.get("GPT_LIGHTNING_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        print("(set GPT_LIGHTNING_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:
        print("stopped by SIGTERM or Ctrl-C; last.ckpt was saved: resume with --ckpt_path last", file=sys.stderr)
        sys.exit(143)
