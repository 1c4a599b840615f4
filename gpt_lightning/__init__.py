"""gpt-lightning: Karpathy's character GPT as a PyTorch Lightning project.

The plain-PyTorch API is importable without Lightning: the model, tokenizer, sampling and data code. The
Lightning shell is `gpt_lightning.training` (the LightningModule, data modules, callbacks and the CLI).
"""

from gpt_lightning.lora import LoRAConfig
from gpt_lightning.model import GPT, PRESETS, GPTConfig
from gpt_lightning.sampling import generate, generate_tokens, sample_next
from gpt_lightning.sources import load_model
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "PRESETS",
    "BPETokenizer",
    "CharTokenizer",
    "GPTConfig",
    "LoRAConfig",
    "generate",
    "generate_tokens",
    "load_model",
    "sample_next",
]
