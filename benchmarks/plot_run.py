"""Training and validation loss of one run, plotted from its TensorBoard event files: what a working run
looks like, as the README shows it.

    pip install -e ".[plots]"
    python -m benchmarks.plot_run runs/pretrain_cpu/version_0 --output docs/training_run.png

It prints the points it plots: the last training loss and every validation.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks.common import scalars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder: runs/<name>/version_N")
    parser.add_argument("--output", type=Path, default=Path("training_run.png"))
    args = parser.parse_args()
    logged = scalars(args.run)
    if "train/loss" not in logged or "val/loss" not in logged:
        raise SystemExit(f"{args.run} has no train/loss and val/loss scalars: give a run folder of `main.py fit`.")
    train, val = logged["train/loss"], logged["val/loss"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=120)
    axes.plot(*zip(*train, strict=True), color="#9bb7d4", linewidth=1, label="train/loss (each logging step)")
    axes.plot(*zip(*val, strict=True), "o-", color="#c0392b", label="val/loss (whole validation split)")
    axes.axhline(math.log(65), color="grey", linestyle=":", linewidth=1)
    axes.text(train[-1][0], math.log(65), "ln 65: a uniform guess", ha="right", va="bottom", color="grey", fontsize=8)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats per character)")
    axes.set_title(f"{args.run}: final val/loss {val[-1][1]:.3f}", fontsize=10)
    axes.legend(frameon=False)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.output)
    print(f"train/loss at step {train[-1][0] + 1}: {train[-1][1]:.4f}")
    print("val/loss: " + ", ".join(f"{loss:.4f} @{step + 1}" for step, loss in val))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
