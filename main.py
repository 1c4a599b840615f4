"""Entry point: `python main.py fit --config configs/pretrain.yaml` (see README.md)."""

from gpt_lightning.training.cli import main

if __name__ == "__main__":
    main()
