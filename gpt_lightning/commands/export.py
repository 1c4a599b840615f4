"""`python main.py export`: a checkpoint as a Hugging Face GPT-2 folder, or as a plain checkpoint of ours."""

from __future__ import annotations

from pathlib import Path

from gpt_lightning.data.instruct import chat_template
from gpt_lightning.hf import export_hf_gpt2
from gpt_lightning.sources import export_plain_checkpoint, load_model, open_source


def export(ckpt_path: str, output: str) -> Path:
    """Write a checkpoint as a Hugging Face GPT-2 folder or as a plain checkpoint of ours.

    The folder (config.json, model.safetensors, and vocab.json or, for BPE, tokenizer.json) gives the same
    logits with `transformers.GPT2LMHeadModel.from_pretrained(output)`. A fine-tune on task data takes its
    template along as a chat template in tokenizer_config.json. An output ending in .ckpt gets a
    plain checkpoint (weights and description, no training state) for generate, init_from and export. A
    LoRA fine-tune is merged first: its low-rank updates are folded into the weights.

    Args:
        ckpt_path: A checkpoint written by `fit`. Architecture and vocabulary come from it.
        output: A new folder (or an empty one), or a new .ckpt file: nothing is ever overwritten.

    Returns:
        The folder or file written.
    """
    gpt, tokenizer = load_model(ckpt_path, merge_lora=True)
    source = open_source(ckpt_path)
    merged = " (its LoRA updates merged into the weights)" if source.lora else ""
    if output.endswith(".ckpt"):
        written = export_plain_checkpoint(ckpt_path, gpt, output)
        print(f"exported {ckpt_path}{merged} to {written}: sample it with `python main.py generate --ckpt_path "
              f"{written}`, or fine-tune it with --model.init_from {written}")  # fmt: skip
        return written
    template = None if source.template is None else chat_template(source.template)
    written = export_hf_gpt2(gpt, tokenizer, output, template)
    print(f"exported {ckpt_path}{merged} to {written}: load it with "
          f"GPT2LMHeadModel.from_pretrained({str(written)!r})")  # fmt: skip
    return written
