"""Our GPT as a Hugging Face GPT-2 folder: `config.json`, `model.safetensors` and the vocabulary, so that
`transformers.GPT2LMHeadModel.from_pretrained(folder)` gives the same logits. Plain torch; `safetensors`
is imported where it is used (the `hf` extra).

The two models are one architecture with other names. Hugging Face's GPT-2 keeps its projections in
`Conv1D` layers, whose weights are stored (in, out) where `nn.Linear` stores (out, in); it always has
biases, so a model trained without them exports zeros; its head is tied to the token embedding, as ours.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.tokenizer import CharTokenizer

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored transposed by Hugging Face
LAYER_NORMS = ("ln_1", "ln_2")


def hf_gpt2_config(config: GPTConfig) -> dict:
    """config.json of the same model. Our MLP's GELU is exact: Hugging Face's "gelu" (its GPT-2 default,
    "gelu_new", is the tanh approximation)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": 4 * config.n_embd,
        "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "tie_word_embeddings": True,
        "bos_token_id": None,  # a character vocabulary has no special tokens
        "eos_token_id": None,
    }


def hf_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face GPT-2's names and layouts (the tied head is not stored)."""
    ours, n_embd = model.state_dict(), model.config.n_embd

    def bias(name: str, size: int) -> torch.Tensor:
        return ours.get(f"{name}.bias", torch.zeros(size))

    theirs = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"]}
    for i in range(model.config.n_layer):
        for norm in LAYER_NORMS:
            theirs[f"transformer.h.{i}.{norm}.weight"] = ours[f"h.{i}.{norm}.weight"]
            theirs[f"transformer.h.{i}.{norm}.bias"] = bias(f"h.{i}.{norm}", n_embd)
        for name in CONV1D:
            weight = ours[f"h.{i}.{name}.weight"]  # (out, in)
            theirs[f"transformer.h.{i}.{name}.weight"] = weight.t()  # (in, out)
            theirs[f"transformer.h.{i}.{name}.bias"] = bias(f"h.{i}.{name}", weight.shape[0])
    theirs["transformer.ln_f.weight"] = ours["ln_f.weight"]
    theirs["transformer.ln_f.bias"] = bias("ln_f", n_embd)
    # safetensors stores each tensor once and contiguous: no views, no shared storage.
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in theirs.items()}


def export_hf_gpt2(model: GPT, tokenizer: CharTokenizer, output: str | Path) -> Path:
    """Writes `output` as a Hugging Face GPT-2 folder, whole or not at all: an existing folder with files in
    it is never overwritten. The vocabulary goes to `vocab.json` ({character: id}), so that text maps to
    ids without our code: `ids = [vocab[c] for c in text]`."""
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError("export needs safetensors: pip install -e '.[hf]'") from err
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not an empty folder: export into a new folder.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        save_file(hf_gpt2_state_dict(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = json.dumps(hf_gpt2_config(model.config), indent=2)
        (staging / "config.json").write_text(config + "\n", encoding="utf-8")
        vocab = {char: i for i, char in enumerate(tokenizer.vocab)}
        (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
