"""`python main.py serve`: a model behind a streaming HTTP API and a page, on LitServe."""

from __future__ import annotations

from gpt_lightning.commands.device import AUTO, Device


def serve(
    ckpt_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queue: int = 16,
    max_new_tokens_limit: int = 2000,
    max_prompt_chars: int = 4000,
    trainer: Device = AUTO,
) -> None:
    """Serve a model over HTTP until Ctrl-C, SIGTERM or SIGHUP.

    A page at /, a streaming API at POST /predict, OpenAI's API under /v1 (completions, and chat completions
    for a chat model) and the model's description at GET /model, on LitServe (pip install -e '.[serve]').

    Args:
        ckpt_path: A checkpoint written by `fit`, a Hugging Face GPT-2 folder or a hub name (gpt2, ...).
            Fixed at start: requests never name files.
        host: The address to listen on. 127.0.0.1 (the default) answers this machine only; 0.0.0.0 answers
            the network, with no authentication.
        port: The port to listen on.
        max_queue: Requests in progress or waiting at once; beyond it a request gets a 503 at once.
        max_new_tokens_limit: The most tokens one request may ask for.
        max_prompt_chars: The longest prompt one request may send, in characters.
        trainer: Where the model runs, with the names of fit's --trainer options.
    """
    from gpt_lightning.serving.requests import Limits
    from gpt_lightning.serving.server import serve

    if max_queue < 1 or max_new_tokens_limit < 1 or max_prompt_chars < 1:
        raise ValueError("max_queue, max_new_tokens_limit and max_prompt_chars must be >= 1.")
    accelerator = "cuda" if trainer.torch_device().type == "cuda" else "cpu"
    serve(ckpt_path, host, port, Limits(max_prompt_chars, max_new_tokens_limit, max_queue), accelerator)
