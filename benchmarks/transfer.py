"""Does pre-training help fine-tuning? The two-stage claim, measured on a target pre-training never saw.

    python -m benchmarks.transfer --data-dir D --plot docs/transfer.png

For each seed it
  (a) pre-trains with configs/pretrain_cpu.yaml (or takes the checkpoint given with --pretrained),
  (b) evaluates that checkpoint on the target's validation split as it is (zero-shot),
  (c) fine-tunes it with configs/finetune.yaml (The Tempest, held out from pre-training): every weight
      (full), and, with `--method full lora`, with LoRA at each rank of `--ranks` (at `--lora-lr`),
  (d) trains the same architecture from scratch on the target with the pre-training recipe's learning
      rate and schedule: for as many steps as the fine-tune (equal steps), and for as many as
      pre-training and fine-tuning together (equal compute),
and it measures forgetting: the loss on pre-training's validation split, with the target's speeches
left out, before and after each fine-tune. Each fine-tune also reports its trainable parameters, the bytes
of its optimizer state, its time per training step and the peak resident memory sampled at its step ends;
each scratch run reports its best validation point (what early stopping would keep) beside its last.
Every run goes through the project's own LightningCLI. All losses are full-validation losses (every
window of the split once); bits per character = loss / ln 2.

Options after the known ones go to every run's CLI, e.g. `--model.n_layer 2` (all runs must agree on
the architecture, as a fine-tune takes its checkpoint's).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from benchmarks.common import CONFIGS, ROOT, callbacks_of, recipe_cli, recipe_files, recipe_settings, resident_bytes
from gpt_lightning.data.corpus import SPEECH_BREAK, SequentialWindows, corpus_path, read_text, speaker_of
from gpt_lightning.model import GPT
from gpt_lightning.sampling import generate
from gpt_lightning.sources import load_model
from gpt_lightning.tokenizer import Tokenizer
from gpt_lightning.training.callbacks import LastCheckpoint
from gpt_lightning.training.cli import GPTLightningCLI

(PRETRAIN,) = recipe_files("cpu")
FINETUNE = CONFIGS / "finetune.yaml"
QUIET = ["--progress_bar.refresh_rate=0", "--trainer.enable_model_summary=false", "--sample.every_n_validations=0",
         "--checkpoint.save_top_k=0"]  # fmt: skip


def without_speeches_of(text: str, speakers: list[str]) -> str:
    """The text with the speeches of the given speakers left out: the rest of a play, say."""
    wanted = {s.upper() for s in speakers}
    return "\n\n".join(b.strip("\n") for b in SPEECH_BREAK.split(text) if speaker_of(b) not in wanted) + "\n"


class StepCost(Callback):
    """Time spent in training steps (validation excluded) and the largest resident set seen at a step's end."""

    def __init__(self) -> None:
        self.seconds, self.steps, self.peak_rss = 0.0, 0, 0
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._start
        self.steps += 1
        self.peak_rss = max(self.peak_rss, resident_bytes())


class ValCurve(Callback):
    """(step, val/loss) at each validation of a fit."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


@dataclass
class Seed:
    seed: int
    losses: dict[str, float] = field(default_factory=dict)  # what -> target (or pre-training) val loss
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)  # fine-tune -> what it cost


def cli(config: list[str], seed: int, runs: Path, name: str, extra: list[str]) -> GPTLightningCLI:
    return recipe_cli(
        [
            *config,
            f"--seed_everything={seed}",
            f"--data.seed={seed}",
            f"--trainer.logger.init_args.save_dir={runs}",
            f"--trainer.logger.init_args.name={name}",
            *QUIET,
            *extra,
        ]
    )


def fit(c: GPTLightningCLI, cost: StepCost | None = None) -> tuple[float, list[tuple[int, float]]]:
    curve = ValCurve()
    callbacks_of(c.trainer).extend([curve] if cost is None else [curve, cost])
    c.trainer.fit(c.model, datamodule=c.datamodule)
    return curve.points[-1][1], curve.points


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))  # fmt: skip


@torch.inference_mode()
def evaluate(model: GPT, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean loss per character over every block_size window of `tokens`, once each."""
    windows = SequentialWindows(tokens, model.config.block_size)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        x, y = zip(*(windows[i] for i in range(start, min(start + batch_size, len(windows)))), strict=True)
        logits = model(torch.stack(x))
        total += F.cross_entropy(logits.flatten(0, 1), torch.stack(y).flatten(), reduction="sum").item()
        count += sum(t.numel() for t in y)
    return total / count


def sample(model: GPT, tokenizer: Tokenizer, prompt: str, tokens: int) -> str:
    generator = torch.Generator().manual_seed(0)
    idx = generate(model, tokenizer.encode(prompt)[None], tokens, temperature=0.8, generator=generator)
    return tokenizer.decode(idx[0])


def run_seed(seed: int, args: argparse.Namespace, data: list[str], extra: list[str], work: Path,
             pretrained: str | None, forgetting_text: str) -> Seed:  # fmt: skip
    result = Seed(seed)
    finetune_config = recipe_settings([FINETUNE])
    target = [*data, *args.target]
    start = time.perf_counter()
    if pretrained is None:  # (a)
        c = cli(["--config", str(PRETRAIN), *data, *steps(args.pretrain_steps, PRETRAIN)], seed, work,
                f"pretrain-{seed}", extra)  # fmt: skip
        result.losses["pre-training val"], _ = fit(c)
        last = next(cb for cb in callbacks_of(c.trainer) if isinstance(cb, LastCheckpoint)).last_path
        pretrained, pretrain_steps = str(last), c.trainer.global_step
    else:
        pretrain_steps = int(torch.load(pretrained, map_location="cpu", weights_only=True)["global_step"])
    before, tokenizer = load_model(pretrained)

    # (b) and (c): the fine-tunes' own CLI, validated before the first one trains.
    after: dict[str, GPT] = {}
    for method, rank in methods(args):
        lora = [] if rank is None else [f"--model.lora.rank={rank}", f"--model.learning_rate={args.lora_lr}",
                                        f"--model.min_lr={args.lora_lr}"]  # fmt: skip
        c = cli(["--config", str(FINETUNE), "--config", str(CONFIGS / "trainer/cpu.yaml"), *target,
                 *steps(args.finetune_steps, FINETUNE), f"--model.init_from={pretrained}", *lora], seed, work,
                f"finetune-{method}-{seed}", extra)  # fmt: skip
        if "zero-shot" not in result.losses:
            (zero_shot,) = c.trainer.validate(c.model, datamodule=c.datamodule, verbose=False)
            result.losses["zero-shot"] = zero_shot["val/loss"]
        cost = StepCost()
        result.losses[method], result.curves[method] = fit(c, cost)
        result.costs[method] = {
            "trainable": sum(p.numel() for p in c.model.parameters() if p.requires_grad),
            "optimizer bytes": optimizer_state_bytes(c.trainer.optimizers[0]),
            "ms/step": 1000 * cost.seconds / max(cost.steps, 1),
            "peak RSS": cost.peak_rss,
        }
        finetune_steps = c.trainer.global_step
        after[method] = c.model.gpt.eval()
    val_every = min(finetune_steps, finetune_config["trainer"]["val_check_interval"])

    # Forgetting: pre-training's validation split, the target's speeches left out.
    tokens = tokenizer.encode(forgetting_text)
    result.losses["forgetting: before"] = evaluate(before, tokens)
    for method, model in after.items():
        result.losses[f"forgetting: after {method}"] = evaluate(model, tokens)

    # (d) from scratch on the target, with the pre-training recipe's LR and schedule.
    baselines = [("scratch, equal steps", finetune_steps, val_every),
                 ("scratch, equal compute", pretrain_steps + finetune_steps, args.scratch_val_every)]  # fmt: skip
    for name, length, every in baselines:
        schedule = [f"--trainer.max_steps={length}", f"--trainer.val_check_interval={min(every, length)}"]
        c = cli(["--config", str(PRETRAIN), *target, *schedule], seed, work, f"scratch-{length}-{seed}", extra)
        result.losses[name], result.curves[name] = fit(c)
        result.losses[f"{name}, best"] = min(loss for _, loss in result.curves[name])
        result.samples[name] = sample(c.model.gpt.eval(), c.datamodule.tokenizer, args.prompt, args.sample_tokens)
    result.samples["zero-shot"] = sample(before, tokenizer, args.prompt, args.sample_tokens)
    for method, model in after.items():
        result.samples[method] = sample(model, tokenizer, args.prompt, args.sample_tokens)
    print(f"seed {seed} ({time.perf_counter() - start:.0f} s): "
          + ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items()), flush=True)  # fmt: skip
    return result


def methods(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """(name, LoRA rank) of each fine-tune: full fine-tuning is "fine-tuned", as in the tables."""
    chosen = [("fine-tuned", None)] if "full" in args.method else []
    return chosen + ([(f"LoRA r{rank}", rank) for rank in args.ranks] if "lora" in args.method else [])


def steps(max_steps: int | None, config: Path) -> list[str]:
    """Overrides a recipe's length, validating at its own cadence or at the end if that comes first."""
    if max_steps is None:
        return []
    every = min(max_steps, recipe_settings([config])["trainer"]["val_check_interval"])
    return [f"--trainer.max_steps={max_steps}", f"--trainer.val_check_interval={every}"]


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def plot(results: list[Seed], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install -e '.[plots]'), so {path} was not written")
        return
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    colors = {"fine-tuned": "tab:blue", "scratch, equal steps": "tab:orange"}
    for name, color in colors.items():
        for i, r in enumerate(results):
            steps, losses = zip(*r.curves[name], strict=True)
            ax.plot(steps, losses, color=color, alpha=0.8, label=name if i == 0 else None)
    zero = statistics.mean(r.losses["zero-shot"] for r in results)
    ax.axhline(zero, color="gray", linestyle="--", label="zero-shot (pre-trained, not fine-tuned)")
    ax.set(xlabel="fine-tuning step", ylabel="target validation loss", title="The Tempest: fine-tune vs from scratch")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot: {path}")


def plot_forgetting(results: list[Seed], args: argparse.Namespace, path: Path) -> None:
    """Target loss against forgetting: one point per fine-tuning method (the mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    before = statistics.mean(r.losses["forgetting: before"] for r in results)
    zero = statistics.mean(r.losses["zero-shot"] for r in results)
    ax.scatter([before], [zero], color="gray", marker="s", label="pre-trained (not fine-tuned)")
    for (method, _), color in zip(methods(args), ["tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple"],
                                  strict=False):  # fmt: skip
        forgetting = [r.losses[f"forgetting: after {method}"] for r in results]
        target = [r.losses[method] for r in results]
        ax.scatter([statistics.mean(forgetting)], [statistics.mean(target)], color=color,
                   label="full fine-tuning" if method == "fine-tuned" else method)  # fmt: skip
    ax.set(
        xlabel="loss on the other held-out plays (forgetting: lower is better)",
        ylabel="target (The Tempest) val loss",
        title="Fine-tuning: target gained against generality lost",
    )
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--data-path", help="pre-train on this text file instead of the corpus (the target too)")
    parser.add_argument("--speakers", nargs="+", help="the target's speakers (default: configs/finetune.yaml's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--pretrained", nargs="+", help="checkpoint(s) to fine-tune instead of pre-training: one, "
                        "or one per seed")  # fmt: skip
    parser.add_argument("--pretrain-steps", type=int, help="pre-training steps (default: the recipe's)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps (default: configs/finetune.yaml's)")
    parser.add_argument("--method", nargs="+", choices=["full", "lora"], default=["full"],
                        help="fine-tuning methods to compare")  # fmt: skip
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], help="LoRA ranks (with --method lora)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's constant learning rate: 10x full "
                        "fine-tuning's 1e-4, the ratio of litgpt's defaults (3e-4 against 3e-5)")  # fmt: skip
    parser.add_argument("--plot-forgetting", type=Path, help="write target loss against forgetting to this PNG")
    parser.add_argument("--scratch-val-every", type=int, default=250, help="validation cadence, equal compute")
    parser.add_argument("--prompt", default="PROSPERO:")
    parser.add_argument("--sample-tokens", type=int, default=200)
    parser.add_argument("--plot", type=Path, help="write the validation curves to this PNG (needs [plots])")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args, extra = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    finetune_data = recipe_settings([FINETUNE])["data"]
    speakers = args.speakers or finetune_data["speakers"]
    span = finetune_data["text_span"]
    args.target = [f"--data.speakers=[{', '.join(speakers)}]", f"--data.text_span=[{span[0]}, {span[1]}]"]
    data = [f"--data.path={args.data_path}"] if args.data_path else [f"--data.data_dir={args.data_dir}"]
    source = Path(args.data_path) if args.data_path else corpus_path(args.data_dir)
    text = read_text(source, "the text")
    held_out = text[int(len(text) * span[0]) :]  # pre-training's validation split (nanoGPT's 90/10)
    forgetting_text = without_speeches_of(held_out, speakers)
    pretrained = args.pretrained or [None]
    if len(pretrained) not in (1, len(args.seeds)):
        parser.error("give one --pretrained checkpoint, or one per seed")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_seed(seed, args, data, extra, Path(tmp), pretrained[i % len(pretrained)], forgetting_text)
                   for i, seed in enumerate(args.seeds)]  # fmt: skip
    elapsed = time.perf_counter() - start

    n = len(results)
    print(f"\n{n} seeds, {elapsed / 60:.1f} min. Target: the speeches of {', '.join(speakers)} in the last 10% "
          f"of the text; its own last 10% is the validation split.\n")  # fmt: skip
    print("| model | target val loss | target bits/char |")
    print("|---|---|---|")
    rows = ["zero-shot", *(m for m, _ in methods(args))]
    rows += [f"{name}{best}" for name in ("scratch, equal steps", "scratch, equal compute") for best in ("", ", best")]
    for name in rows:
        values = [r.losses[name] for r in results]
        print(f"| {name} | {mean_std(values)} | {mean_std([v / math.log(2) for v in values])} |")
    print("\n| pre-training's validation split, target left out | val loss |")
    print("|---|---|")
    print(f"| before fine-tuning | {mean_std([r.losses['forgetting: before'] for r in results])} |")
    for method, _ in methods(args):
        label = "fine-tuning" if method == "fine-tuned" else method
        print(f"| after {label} | {mean_std([r.losses[f'forgetting: after {method}'] for r in results])} |")
    print("\n| fine-tune | trainable parameters | optimizer state | ms/step | peak RSS |")
    print("|---|---|---|---|---|")
    for method, _ in methods(args):
        cost = {k: statistics.mean(r.costs[method][k] for r in results) for k in results[0].costs[method]}
        print(f"| {method} | {cost['trainable']:,.0f} | {cost['optimizer bytes'] / 1e3:,.1f} kB | "
              f"{cost['ms/step']:.1f} | {cost['peak RSS'] / 1e6:,.0f} MB |")  # fmt: skip
    if all("pre-training val" in r.losses for r in results):
        values = [r.losses["pre-training val"] for r in results]
        print(f"\npre-training recipe ({PRETRAIN.relative_to(ROOT)}), full-validation loss: {mean_std(values)} "
              f"(mean ± std of {n} seeds)")  # fmt: skip
    print(f"\nsamples (seed {results[0].seed}, prompt {args.prompt!r}, temperature 0.8, sampling seed 0):")
    for name, text_ in results[0].samples.items():
        print(f"--- {name}\n{text_}")
    if args.plot and "full" in args.method:
        plot(results, args.plot)
    if args.plot_forgetting:
        plot_forgetting(results, args, args.plot_forgetting)
    means = {k: statistics.mean(r.losses[k] for r in results) for k in (rows[1], "scratch, equal steps", "zero-shot")}
    print(f"transfer: {rows[1]} {means[rows[1]]:.4f}, from scratch {means['scratch, equal steps']:.4f}, "
          f"zero-shot {means['zero-shot']:.4f} (target val loss, mean of {n} seeds)")  # fmt: skip


if __name__ == "__main__":
    main()
