"""The model, tokenizer, sampling and data code are plain PyTorch: importing them must not import Lightning."""

import subprocess
import sys

PLAIN = ["gpt_lightning", "gpt_lightning.model", "gpt_lightning.tokenizer", "gpt_lightning.generate",
         "gpt_lightning.data", "gpt_lightning.token_cache", "gpt_lightning.checkpoint", "gpt_lightning.optim",
         "gpt_lightning.hf", "gpt_lightning.lora", "gpt_lightning.serve", "gpt_lightning.tokenizer_training",
         "gpt_lightning.tokenizer_eval", "gpt_lightning.evaluation", "gpt_lightning.evaluation.tasks",
         "gpt_lightning.evaluation.builtin", "gpt_lightning.evaluation.scoring", "gpt_lightning.evaluation.metrics",
         "gpt_lightning.evaluation.run", "gpt_lightning.commands"]  # fmt: skip


def test_plain_modules_do_not_import_lightning():
    code = (
        f"import sys; import {', '.join(PLAIN)}; "
        "wrappers = {'lightning', 'pytorch_lightning', 'torchmetrics'}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in wrappers); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"Lightning imported by the plain modules: {result.stdout}{result.stderr}"
