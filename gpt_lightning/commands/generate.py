"""`python main.py generate`: sample text from a model source, streamed to stdout."""

from __future__ import annotations

import sys
from pathlib import Path

from gpt_lightning.commands.device import AUTO_FLOAT32, DeviceAndPrecision
from gpt_lightning.data.corpus import read_text
from gpt_lightning.data.instruct import render_prompt
from gpt_lightning.sampling import DEFAULT_SAMPLING, SamplingOptions, check_prompt, stream_text
from gpt_lightning.sources import load_model, open_source


def generate(
    ckpt_path: str,
    prompt: str = "\n",
    prompt_file: str | None = None,
    max_new_tokens: int = DEFAULT_SAMPLING.max_new_tokens,
    temperature: float = DEFAULT_SAMPLING.temperature,
    top_k: int | None = DEFAULT_SAMPLING.top_k,
    top_p: float | None = DEFAULT_SAMPLING.top_p,
    num_samples: int = 1,
    seed: int = DEFAULT_SAMPLING.seed,
    use_kv_cache: bool = True,
    raw: bool = False,
    trainer: DeviceAndPrecision = AUTO_FLOAT32,
) -> list[str]:
    """Sample text from a checkpoint, streaming it to stdout as it is generated.

    Args:
        ckpt_path: A checkpoint written by `fit` (pre-training or fine-tuning), a Hugging Face GPT-2 folder
            (config.json, model.safetensors, tokenizer.json) or a hub name: gpt2, gpt2-medium, gpt2-large,
            gpt2-xl. Architecture and vocabulary come from it.
        prompt: Text to continue. With a character vocabulary, every character must be in it.
        prompt_file: Read the prompt from this UTF-8 file instead.
        max_new_tokens: Tokens (characters, for a character model) to generate per sample.
        temperature: Softmax temperature: below 1 is more conservative, 0 is greedy (argmax).
        top_k: Sample from the k most likely tokens only (clamped to the vocabulary). Unset: all.
        top_p: Nucleus sampling: the smallest set of tokens whose probability reaches p, in (0, 1].
        num_samples: Samples to draw, one after another.
        seed: Seed of the sampler, from 0 to 2**64 - 1: the same seed gives the same text.
        use_kv_cache: Reuse attention keys and values between steps; the output is the same either way.
        raw: Feed the prompt as it is, even to a model fine-tuned on task data. Off: such a model's template
            turns the prompt into its input (plain: `Q: PROMPT` and `A: `), and a sample ends at its end marker.
        trainer: Where the model runs, with the names of fit's --trainer options.

    Returns:
        The samples, each with its prompt.
    """
    options = SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if prompt_file is not None:
        prompt = read_text(Path(prompt_file), "prompt_file")
    plain, tokenizer = load_model(ckpt_path)
    template = None if raw else open_source(ckpt_path).template  # None for a model of plain text
    prompt = render_prompt(template, prompt)
    stop = () if template is None else (template.end,)
    check_prompt(
        tokenizer, prompt, what="the prompt" if template is None else f"the prompt in template {template.name}"
    )
    gpt, precision = trainer.place(plain)
    generator = options.generator()  # one for all samples: each continues where the last left it
    out = sys.stdout  # the text alone: messages go to stderr
    samples = []
    for i in range(num_samples):
        if i:
            out.write("\n" + "-" * 40 + "\n")
        out.write(prompt)
        text = [prompt]
        with precision:
            for piece in stream_text(gpt, tokenizer, prompt, options, generator, use_kv_cache, stop=stop):
                text.append(piece)
                out.write(piece)
                out.flush()
        samples.append("".join(text))
    out.write("\n")
    out.flush()
    return samples
