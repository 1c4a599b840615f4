"""`python main.py serve`: a model behind a streaming HTTP API and a page, on LitServe (the `serve` extra).

    POST /predict   {"prompt": "ROMEO:", "max_new_tokens": 200, "temperature": 0.8, "top_k": null,
                     "top_p": null, "seed": 1337}  ->  one JSON object per line: {"text": "..."}, the new text
                     as it is generated, then {"done": true, ...}. The same options give the text that
                     `python main.py generate` prints.
    GET  /model     what the model is: parameters, vocabulary, context, what it was trained on, its loss.
    GET  /          a page to try prompts: one HTML file, no build step, nothing fetched from elsewhere.

LitServe runs the model in a worker process and answers HTTP in another. Two things it does not do are
done here, in a small ASGI middleware in front of /predict (`RequestGate`):
- Requests are checked before they are queued. A stream's status is sent before the worker reads its
  request, so a bad field found there could only end a "200 OK" stream; here it is a 4xx JSON error that
  names the field.
- A client that disconnects (or presses Stop) ends its generation. LitServe keeps generating for a client
  that has gone (its issue #165); the gate leaves a mark in a folder that the worker checks between tokens,
  so the worker stops within a token and takes the next request.
It also bounds the requests in progress or waiting: beyond `max_queue`, a fast 503.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gpt_lightning.checkpoint import describe_checkpoint, load_checkpoint, load_model
from gpt_lightning.data import CORPUS_SHA256
from gpt_lightning.generate import stream_text
from gpt_lightning.model import GPT
from gpt_lightning.tokenizer import CharTokenizer, Tokenizer

try:
    from litserve import LitAPI
except ImportError:  # the `serve` extra is not installed: serve() says how to install it
    LitAPI = object  # type: ignore[assignment, misc]

PAGE = Path(__file__).with_name("serve_page.html")
# The sampling options and their defaults: those of `python main.py generate`.
DEFAULTS: dict[str, Any] = {"max_new_tokens": 500, "temperature": 0.8, "top_k": None, "top_p": None, "seed": 1337}
FIELDS = ("prompt", *DEFAULTS)
# Text generated within this interval goes out as one message. Each message crosses from LitServe's worker
# process to its HTTP process on its own; one per token cost a third of the throughput on 2 cores
# (benchmarks/serve_load.py). 50 updates a second still read as a live stream.
MESSAGE_INTERVAL_S = 0.02
log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may be in progress or waiting at once."""

    max_prompt_chars: int = 4000
    max_new_tokens: int = 2000
    max_queue: int = 16


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status and the field at fault."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field = status, field

    def to_dict(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}


def parse_request(body: bytes, tokenizer: Tokenizer, limits: Limits) -> dict[str, Any]:
    """The sampling request in `body`, checked field by field, with generate's defaults filled in."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, None, f"the body is not JSON ({err}): send an object such as "
                                      '{"prompt": "ROMEO:", "max_new_tokens": 100}.') from None  # fmt: skip
    if not isinstance(data, dict):
        raise RequestError(400, None, f"the body must be a JSON object with a prompt, not a {type(data).__name__}.")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(
            422, unknown[0], f"unknown field(s) {', '.join(unknown)}: the fields are {', '.join(FIELDS)}."
        )
    request = {**DEFAULTS, **data}
    prompt = request.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(422, "prompt", "prompt must be a non-empty string: the text to continue.")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(422, "prompt", f"prompt has {len(prompt):,} characters, more than the limit of "
                                          f"{limits.max_prompt_chars:,}: shorten it.")  # fmt: skip
    if isinstance(tokenizer, CharTokenizer) and (missing := tokenizer.unknown_chars(prompt)):
        shown = ", ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise RequestError(422, "prompt", f"prompt has {len(missing)} character(s) outside the model's "
                                          f"{tokenizer.vocab_size}-character vocabulary: {shown}.")  # fmt: skip
    _check_int(request, "max_new_tokens", 1, limits.max_new_tokens)
    _check_int(request, "seed", 0, 2**63 - 1)
    temperature = request["temperature"]
    if not _is_number(temperature) or temperature < 0:
        raise RequestError(422, "temperature", f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}.")
    if request["top_k"] is not None:
        _check_int(request, "top_k", 1, None, "or null to keep every token")
    top_p = request["top_p"]
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise RequestError(422, "top_p", f"top_p must be in (0, 1], or null to keep every token, got {top_p!r}.")
    return request


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(request: dict[str, Any], field: str, low: int, high: int | None, unset: str = "") -> None:
    value = request[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high:,}"
        raise RequestError(422, field, f"{field} must be an integer {bounds}{', ' + unset if unset else ''}, "
                                       f"got {value!r}.")  # fmt: skip


def describe_model(ckpt_path: str) -> dict[str, Any]:
    """What GET /model answers: the model's size and vocabulary, what it was trained on and its best
    validation loss, as far as the checkpoint records them."""
    facts = describe_checkpoint(ckpt_path)
    with torch.device("meta"):
        parameters = GPT(facts.config).num_parameters()
    described: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "parameters": parameters,
        "vocab_size": facts.tokenizer.vocab_size,
        "tokenizer": "characters" if isinstance(facts.tokenizer, CharTokenizer) else "byte-level BPE",
        "context": facts.config.block_size,
        "layers": facts.config.n_layer,
        "width": facts.config.n_embd,
        "trained_on": None,
        "steps": facts.global_step,
        "val_loss": None,
        "lora": None if facts.lora is None else dataclasses.asdict(facts.lora),
        "defaults": DEFAULTS,
    }
    if facts.hf_folder is not None:
        described["trained_on"] = f"a Hugging Face GPT-2 ({facts.hf_folder})"
        return described
    if facts.data:
        selection = {k: v for k, v in facts.data.get("selection", {}).items() if v}
        source = "tiny Shakespeare" if facts.data.get("source_sha256") == CORPUS_SHA256 else facts.data.get("source")
        described["trained_on"] = {"source": source, **selection}
    callbacks = load_checkpoint(ckpt_path).get("callbacks", {})
    scores = [float(state["best_model_score"]) for key, state in callbacks.items()
              if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None]  # fmt: skip
    described["val_loss"] = min(scores) if scores else None
    return described


class GPTStreamAPI(LitAPI):
    """Runs in LitServe's worker process: loads the model once, then streams each request's text."""

    def __init__(self, ckpt_path: str, cancel_dir: str) -> None:
        super().__init__(stream=True, api_path="/predict")
        self.ckpt_path, self.cancel_dir = ckpt_path, Path(cancel_dir)

    def setup(self, device: str) -> None:
        if not log.handlers:  # a fresh process: say when a stream stops early, on stderr as the server does
            log.addHandler(logging.StreamHandler())
            log.setLevel(logging.INFO)
        self.gpt, self.tokenizer = load_model(self.ckpt_path)
        self.device = torch.device(device)
        self.gpt.to(self.device)

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        # Left unannotated: LitServe reads the annotation to choose how to parse the body (unannotated: JSON).
        return request  # checked by RequestGate before it was queued

    def predict(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        mark = self.cancel_dir / request["stream_id"]
        produced, pending, sent_at = 0, "", -math.inf
        # The sampler's generator is seeded as `python main.py generate` seeds it: the same options, the same text.
        generator = torch.Generator().manual_seed(request["seed"])
        texts = stream_text(self.gpt, self.tokenizer, request["prompt"], request["max_new_tokens"],
                            request["temperature"], request["top_k"], request["top_p"], generator,
                            cancelled=mark.exists)  # fmt: skip
        for text in texts:
            produced += len(text)
            pending += text
            if time.monotonic() - sent_at >= MESSAGE_INTERVAL_S:  # the first piece goes at once
                yield {"text": pending}
                pending, sent_at = "", time.monotonic()
        if pending:
            yield {"text": pending}
        if mark.exists():
            mark.unlink(missing_ok=True)
            log.info("stream %s stopped after %d characters: its client went away", request["stream_id"], produced)
        yield {"text": "", "done": True, "characters": produced}

    def encode_response(self, output: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from output


class RequestGate:
    """ASGI middleware in front of POST /predict: bounds the requests in progress or waiting, checks each
    one before LitServe queues it, and marks the stream of a client that went away as cancelled."""

    def __init__(self, app: Callable, tokenizer_state: dict[str, str], limits: Limits, cancel_dir: str) -> None:
        from gpt_lightning.tokenizer import tokenizer_from_dict

        self.app, self.limits, self.cancel_dir = app, limits, Path(cancel_dir)
        self.tokenizer = tokenizer_from_dict(tokenizer_state)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limits.max_queue:
            return await _respond(
                send,
                503,
                {
                    "error": f"the server is busy: {self.in_flight} requests are in "
                    "progress or waiting (--max_queue). Try again shortly.",
                    "field": None,
                },
            )
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            request = parse_request(body, self.tokenizer, self.limits)
        except RequestError as err:
            return await _respond(send, err.status, err.to_dict())
        stream_id = uuid.uuid4().hex
        forwarded = json.dumps({**request, "stream_id": stream_id}).encode()
        # Forwarded as the JSON it is, whatever content type the client named (curl -d says it sends a form).
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(forwarded)).encode())]
        scope = {**scope, "headers": headers}
        pending: list[Message] = [{"type": "http.request", "body": forwarded, "more_body": False}]
        finished = False

        async def receive_forwarded() -> Message:
            if pending:
                return pending.pop()
            message = await receive()
            if message["type"] == "http.disconnect" and not finished:
                self._cancel(stream_id)
            return message

        async def send_watched(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive_forwarded, send_watched)
        finally:
            self.in_flight -= 1
            if not finished:  # the client went away, or the stream broke: stop its generation
                self._cancel(stream_id)

    def _cancel(self, stream_id: str) -> None:
        (self.cancel_dir / stream_id).touch()


async def _respond(send: Send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(ckpt_path: str, host: str, port: int, limits: Limits, accelerator: str = "cpu") -> None:
    """Serves `ckpt_path` until interrupted: the API, the page and the model's description."""
    try:
        import litserve as ls
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError as err:
        raise ImportError("serving needs LitServe: pip install -e '.[serve]'") from err
    description = describe_model(ckpt_path)  # fails here, before any process starts, if the checkpoint is bad
    tokenizer = describe_checkpoint(ckpt_path).tokenizer
    cancel_dir = tempfile.mkdtemp(prefix="gpt-lightning-serve-")
    try:
        server = ls.LitServer(
            GPTStreamAPI(ckpt_path, cancel_dir),
            accelerator=accelerator,
            devices=1,
            workers_per_device=1,
            # LitServe's timeout limits only the time a request waits in its queue, and would end a stream
            # that waited behind long ones with a 504 after its "200 OK": the queue is bounded instead.
            timeout=False,
            middlewares=[
                (RequestGate, {"tokenizer_state": tokenizer.to_dict(), "limits": limits, "cancel_dir": cancel_dir})
            ],  # fmt: skip
        )
        page = PAGE.read_text(encoding="utf-8")
        server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
        server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
        server.app.add_api_route("/model", lambda: JSONResponse(description), methods=["GET"])
        print(f"serving {ckpt_path} on http://{host}:{port}/ (POST /predict streams JSON lines; GET /model "
              "describes the model). Ctrl-C stops it.", flush=True)  # fmt: skip
        server.run(host=host, port=port, num_api_servers=1, generate_client_file=False)
    finally:
        shutil.rmtree(cancel_dir, ignore_errors=True)
