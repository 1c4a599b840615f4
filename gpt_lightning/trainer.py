"""Lightning's Trainer with two more entry points next to fit and validate: `generate` and `export`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import lightning as L

from gpt_lightning.data import read_text
from gpt_lightning.generate import DEFAULT_SAMPLING, SamplingOptions, check_prompt, stream_text
from gpt_lightning.hf import export_hf_gpt2
from gpt_lightning.model import GPT
from gpt_lightning.sources import export_plain_checkpoint, load_model, open_source


class GPTTrainer(L.Trainer):
    def generate(
        self,
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
        model: Any = None,
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
            top_k: Sample from the k most likely characters only (clamped to the vocabulary). Unset: all.
            top_p: Nucleus sampling: the smallest set of characters whose probability reaches p, in (0, 1].
            num_samples: Samples to draw, one after another.
            seed: Seed of the sampler, from 0 to 2**64 - 1: the same seed gives the same text.
            use_kv_cache: Reuse attention keys and values between steps; the output is the same either way.
            model: Unused: the checkpoint defines the model.
        """
        options = SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if self.world_size > 1 or len(self.device_ids) > 1:
            raise ValueError("generate runs on one device: pass --trainer.devices 1.")
        if prompt_file is not None:
            prompt = read_text(Path(prompt_file), "prompt_file")
        plain, tokenizer = load_model(ckpt_path)
        check_prompt(tokenizer, prompt, what="the prompt")
        # --trainer.precision applies as in fit: "-true" precisions cast the weights (and so the KV cache),
        # "-mixed" ones run under autocast (forward_context below).
        gpt = cast(GPT, self.precision_plugin.convert_module(plain)).to(self.strategy.root_device)
        generator = options.generator()  # one for all samples: each continues where the last left it
        out = sys.stdout  # the text alone: Lightning's messages go to stderr
        samples = []
        for i in range(num_samples):
            if i:
                out.write("\n" + "-" * 40 + "\n")
            out.write(prompt)
            text = [prompt]
            with self.precision_plugin.forward_context():
                for piece in stream_text(gpt, tokenizer, prompt, options, generator, use_kv_cache):
                    text.append(piece)
                    out.write(piece)
                    out.flush()
            samples.append("".join(text))
        out.write("\n")
        out.flush()
        return samples

    def export(self, ckpt_path: str, output: str, model: Any = None) -> Path:
        """Write a checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors, and vocab.json or,
        for BPE, tokenizer.json), so that `transformers.GPT2LMHeadModel.from_pretrained(output)` gives the same
        logits; or, for an output ending in .ckpt, as a plain checkpoint of ours (weights and description, no
        training state) for generate, init_from and export. A LoRA fine-tune is merged first: its low-rank
        updates are folded into the weights.

        Args:
            ckpt_path: A checkpoint written by `fit`. Architecture and vocabulary come from it.
            output: A new folder (or an empty one), or a new .ckpt file: nothing is ever overwritten.
            model: Unused: the checkpoint defines the model.
        """
        gpt, tokenizer = load_model(ckpt_path, merge_lora=True)
        merged = " (its LoRA updates merged into the weights)" if open_source(ckpt_path).lora else ""
        if output.endswith(".ckpt"):
            written = export_plain_checkpoint(ckpt_path, gpt, output)
            print(f"exported {ckpt_path}{merged} to {written}: sample it with `python main.py generate --ckpt_path "
                  f"{written}`, or fine-tune it with --model.init_from {written}")  # fmt: skip
            return written
        written = export_hf_gpt2(gpt, tokenizer, output)
        print(f"exported {ckpt_path}{merged} to {written}: load it with "
              f"GPT2LMHeadModel.from_pretrained({str(written)!r})")  # fmt: skip
        return written

    def serve(
        self,
        ckpt_path: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_queue: int = 16,
        max_new_tokens_limit: int = 2000,
        max_prompt_chars: int = 4000,
        model: Any = None,
    ) -> None:
        """Serve a model until Ctrl-C, SIGTERM or SIGHUP: a page at /, a streaming API at POST /predict and its
        description at GET /model, on LitServe (pip install -e '.[serve]').

        Args:
            ckpt_path: A checkpoint written by `fit`, a Hugging Face GPT-2 folder or a hub name (gpt2, ...).
                Fixed at start: requests never name files.
            host: The address to listen on. 127.0.0.1 (the default) answers this machine only; 0.0.0.0 answers
                the network, with no authentication.
            port: The port to listen on.
            max_queue: Requests in progress or waiting at once; beyond it a request gets a 503 at once.
            max_new_tokens_limit: The most tokens one request may ask for.
            max_prompt_chars: The longest prompt one request may send, in characters.
            model: Unused: the checkpoint defines the model.
        """
        from gpt_lightning.serve import Limits, serve

        if max_queue < 1 or max_new_tokens_limit < 1 or max_prompt_chars < 1:
            raise ValueError("max_queue, max_new_tokens_limit and max_prompt_chars must be >= 1.")
        accelerator = "cuda" if self.strategy.root_device.type == "cuda" else "cpu"
        serve(ckpt_path, host, port, Limits(max_prompt_chars, max_new_tokens_limit, max_queue), accelerator)
