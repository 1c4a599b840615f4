"""`python main.py serve`: a model behind a streaming HTTP API and a page, on LitServe (the `serve` extra).

    POST /predict   {"prompt": "ROMEO:", "max_new_tokens": 200, "temperature": 0.8, "top_k": null,
                     "top_p": null, "seed": 1337}  ->  one JSON object per line: {"text": "..."}, the new text
                     as it is generated, then {"done": true, ...}. The same options give the text that
                     `python main.py generate` prints.
    GET  /model     what the model is: parameters, vocabulary, context, what it was trained on, its loss.
    GET  /          a page to try prompts (or to chat, with a chat model): one HTML file, no build step, nothing
                    fetched from elsewhere.
    POST /v1/completions, POST /v1/chat/completions, GET /v1/models: OpenAI's API (serve_openai.py).

LitServe runs the model in a worker process and answers HTTP in another. Two things it does not do are
done here, in a small ASGI middleware in front of /predict and OpenAI's two endpoints (`RequestGate`):
- Requests are checked before they are queued. A stream's status is sent before the worker reads its
  request, so a bad field found there could only end a "200 OK" stream; here it is a 4xx JSON error that
  names the field.
- A client that disconnects (or presses Stop) ends its generation. LitServe keeps generating for a client
  that has gone (its issue #165); the gate leaves a mark in a folder that the worker checks between tokens,
  so the worker stops within a token and takes the next request.
It also bounds the requests in progress or waiting (beyond `max_queue`, a fast 503) and the size of a body
(beyond what the longest prompt needs, a 413). A request it lets through streams text to its end, or ends its
stream with an error line: {"error": "...", "field": null}.

SIGINT (Ctrl-C), SIGTERM and SIGHUP to the main process stop every process of the server: streams in progress
end with an error line, and the port is free when the main process exits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from gpt_lightning.data.corpus import CORPUS_SHA256
from gpt_lightning.data.instruct import Template
from gpt_lightning.model import GPT
from gpt_lightning.sampling import SamplingOptions, StreamEnd, stream_text
from gpt_lightning.serving.openai_api import (
    ROUTES,
    error_body,
    is_chat_model,
    models_list,
    not_a_chat_model,
    parse_openai_request,
    relayed,
)
from gpt_lightning.serving.requests import (
    OPTIONS,
    Limits,
    Message,
    Receive,
    RequestError,
    Scope,
    Send,
    model_input,
    parse_request,
    respond,
)
from gpt_lightning.sources import load_model, open_source
from gpt_lightning.tokenizer import CharTokenizer

try:
    from litserve import LitAPI
except ImportError:  # the `serve` extra is not installed: serve() says how to install it
    LitAPI = object  # type: ignore[assignment, misc]

PAGE = Path(__file__).with_name("page.html")
# The mark in the cancel folder that tells the worker and the gate that the server is stopping (stream ids are hex).
STOPPING = "stopping"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How long LitServe's shutdown waits for each of its processes. Streams end within a token of the STOPPING mark,
# so this only bounds a worker that hangs; LitServe's own 30 s would outlast `docker stop`'s 10 s.
STOP_TIMEOUT_S = 5
# Text generated within this interval goes out as one message. Each message crosses from LitServe's worker
# process to its HTTP process on its own; one per token cost a third of the throughput on 2 cores
# (python -m benchmarks.serve_load). 50 updates a second still read as a live stream.
MESSAGE_INTERVAL_S = 0.02
log = logging.getLogger(__name__)


def describe_model(ckpt_path: str, limits: Limits | None = None) -> dict[str, Any]:
    """What GET /model answers: the model's size and vocabulary, what it was trained on and its best
    validation loss, as far as the checkpoint records them, and a request's defaults within `limits`."""
    facts = open_source(ckpt_path)
    with torch.device("meta"):
        gpt = GPT(facts.config)
    described: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "parameters": gpt.num_parameters(),
        "padding_parameters": gpt.padding_parameters(),  # the embedding's rows past the vocabulary (model.vocab_size)
        "vocab_size": facts.tokenizer.vocab_size,
        "tokenizer": "characters" if isinstance(facts.tokenizer, CharTokenizer) else "byte-level BPE",
        "context": facts.config.block_size,
        "layers": facts.config.n_layer,
        "width": facts.config.n_embd,
        "trained_on": None,
        "steps": facts.global_step,
        "val_loss": None,
        "lora": None if facts.lora is None else dataclasses.asdict(facts.lora),
        "template": None if facts.template is None else facts.template.name,  # applied to every prompt
        "chat": is_chat_model(facts.template),  # answers /v1/chat/completions
        "defaults": (limits or Limits()).defaults(),
    }
    if facts.hf_folder is not None:
        described["trained_on"] = f"a Hugging Face GPT-2 ({facts.hf_folder})"
        return described
    if facts.data:
        selection = {k: v for k, v in facts.data.get("selection", {}).items() if v}
        source = "tiny Shakespeare" if facts.data.get("source_sha256") == CORPUS_SHA256 else facts.data.get("source")
        described["trained_on"] = {"source": source, **selection}
    described["val_loss"] = facts.best_val_loss
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
        # Ctrl-C in a terminal reaches every process of the group; this one would end mid-request with a
        # traceback. The main process stops it (see `serve`).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.gpt, self.tokenizer = load_model(self.ckpt_path)
        self.template = open_source(self.ckpt_path).template  # a fine-tune's on task data, as generate applies it
        self.device = torch.device(device)
        self.gpt.to(self.device)

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        # Left unannotated: LitServe reads the annotation to choose how to parse the body (unannotated: JSON).
        return request  # checked by RequestGate before it was queued

    def predict(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        mark, stopping = self.cancel_dir / request["stream_id"], self.cancel_dir / STOPPING
        options = SamplingOptions(**{option: request[option] for option in OPTIONS})
        produced, pending, sent_at = 0, "", -math.inf
        # An answer in a fine-tune's template ends at its end marker; text read as it is (/v1/completions) ends
        # where `generate --raw true` ends it, or at the request's own stop strings.
        marker = () if self.template is None or "text" in request else (self.template.end,)
        stop = (*request.get("stop", ()), *marker)
        # Seeded from the options, as `python main.py generate` seeds its sampler: the same options, the same text.
        texts = stream_text(self.gpt, self.tokenizer, model_input(self.template, request), options,
                            cancelled=lambda: mark.exists() or stopping.exists(), stop=stop)  # fmt: skip
        end = StreamEnd("cancelled", 0, 0)
        try:
            while True:
                try:
                    text = next(texts)
                except StopIteration as finished:
                    end = finished.value
                    break
                produced += len(text)
                pending += text
                if time.monotonic() - sent_at >= MESSAGE_INTERVAL_S:  # the first piece goes at once
                    yield {"text": pending}
                    pending, sent_at = "", time.monotonic()
        except Exception as err:  # the stream's "200 OK" is gone: its last line says what happened instead
            log.exception("stream %s failed after %d characters", request["stream_id"], produced)
            if pending:
                yield {"text": pending}
            reason = (str(err).splitlines() or [""])[0][:200]
            yield {"error": f"generation failed after {produced} characters ({type(err).__name__}: {reason}); the "
                            "server's log has the details.", "field": None}  # fmt: skip
            return
        if pending:
            yield {"text": pending}
        if stopping.exists():
            yield {"error": f"the server is stopping: the stream ended after {produced} characters. Send the "
                            "request again once the server is back.", "field": None}  # fmt: skip
            return
        if mark.exists():
            mark.unlink(missing_ok=True)
            log.info("stream %s stopped after %d characters: its client went away", request["stream_id"], produced)
        yield {"text": "", "done": True, "characters": produced, "finish_reason": end.reason,
               "prompt_tokens": end.prompt_tokens, "completion_tokens": end.tokens}  # fmt: skip

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        # Left unannotated: LitServe makes the annotation /predict's response model, and FastAPI could not
        # resolve this module's string annotations when building /openapi.json (a 500, and a broken /docs).
        yield from output


class RequestGate:
    """ASGI middleware in front of POST /predict, /v1/completions and /v1/chat/completions: bounds the requests in
    progress or waiting (the three together) and the size of a body, checks each request before LitServe queues
    it, and marks the stream of a client that went away as cancelled. OpenAI's requests reach the worker as
    /predict's do, and its answer goes back through a `Relay`, in OpenAI's format."""

    def __init__(
        self,
        app: Callable,
        tokenizer_state: dict[str, str],
        limits: Limits,
        cancel_dir: str,
        template_state: dict[str, str] | None = None,
        model: str = "gpt-lightning",
    ) -> None:
        from gpt_lightning.tokenizer import tokenizer_from_dict

        self.app, self.limits, self.cancel_dir = app, limits, Path(cancel_dir)
        self.tokenizer = tokenizer_from_dict(tokenizer_state)
        self.template = None if template_state is None else Template.from_dict(template_state)
        self.model = model  # the name OpenAI's answers echo when a request names none
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" and scope["method"] == "POST" else None
        if path != "/predict" and path not in ROUTES:
            return await self.app(scope, receive, send)
        kind = ROUTES.get(path or "")  # None: /predict
        try:
            if kind == "chat" and not is_chat_model(self.template):
                raise not_a_chat_model(self.template)
            if self.in_flight >= self.limits.max_queue:
                raise RequestError(503, None, f"the server is busy: {self.in_flight} requests are in progress or "
                                              "waiting (--max_queue). Try again shortly.")  # fmt: skip
            if (self.cancel_dir / STOPPING).exists():
                raise RequestError(503, None, "the server is stopping: try again once it is back.")
        except RequestError as err:
            return await self._refuse(kind is not None, send, err)
        # The slot is taken before the body is read, and given back on every path: clients whose bodies come
        # slowly would otherwise all find the count at 0.
        self.in_flight += 1
        stream_id, finished = uuid.uuid4().hex, False
        forwarding = False
        try:
            body = await self._read_body(scope, receive)
            if body is None:  # the client went away while sending
                return
            answer = send
            if kind is None:
                request = parse_request(body, self.tokenizer, self.limits)
            else:
                openai = parse_openai_request(kind, body, self.tokenizer, self.template, self.limits, self.model)
                stopping = (self.cancel_dir / STOPPING).exists
                request, answer = openai.worker, relayed(openai, stream_id, send, stopping)
            forwarded = json.dumps({**request, "stream_id": stream_id}).encode()
            # Forwarded as the JSON it is, whatever content type the client named (curl -d says it sends a form).
            headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(forwarded)).encode())]
            pending: list[Message] = [{"type": "http.request", "body": forwarded, "more_body": False}]

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
                await answer(message)

            forwarding = True
            predict = {**scope, "path": "/predict", "raw_path": b"/predict", "headers": headers}
            await self.app(predict, receive_forwarded, send_watched)
        except RequestError as err:
            await self._refuse(kind is not None, send, err)
        finally:
            self.in_flight -= 1
            if forwarding and not finished:  # the client went away, or the stream broke: stop its generation
                self._cancel(stream_id)

    @staticmethod
    async def _refuse(openai: bool, send: Send, err: RequestError) -> None:
        await respond(send, err.status, error_body(err) if openai else err.to_dict())

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The body, read in chunks and joined once (linear time), and no further than the limit: a 413 past it."""
        limit = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(f"the body is {int(declared):,} bytes, more than the {limit:,}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large(f"the body is longer than the {limit:,} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, what: str) -> RequestError:
        return RequestError(413, None, f"{what} that a prompt of --max_prompt_chars {self.limits.max_prompt_chars:,} "
                                       "characters needs: shorten the prompt.")  # fmt: skip

    def _cancel(self, stream_id: str) -> None:
        (self.cancel_dir / stream_id).touch()


class StopSignals:
    """While active, SIGINT, SIGTERM and SIGHUP to this process raise KeyboardInterrupt once, after `on_stop`:
    LitServe shuts its processes down on a KeyboardInterrupt, and Python's default for SIGTERM and SIGHUP would
    end this process alone, leaving its worker and HTTP processes serving the port, reparented to init. Later
    signals wait for that shutdown. A process forked from this one meanwhile takes each signal's default."""

    def __init__(self, on_stop: Callable[[], None]) -> None:
        self.on_stop, self.owner = on_stop, os.getpid()
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is not None:
            return
        self.received = signal.Signals(signum)
        self.on_stop()
        raise KeyboardInterrupt


def _end_child_processes(timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Ends the processes LitServe started that its own shutdown left: all of them, when a signal came during
    start-up, before LitServe listens for one."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout_s)
        if child.is_alive():
            child.kill()
            child.join()


def serve(ckpt_path: str, host: str, port: int, limits: Limits, accelerator: str = "cpu") -> None:
    """Serves `ckpt_path` until SIGINT (Ctrl-C), SIGTERM or SIGHUP: the API, the page and the model's
    description. Returns once every process of the server has ended."""
    try:
        import litserve as ls
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError as err:
        raise ImportError("serving needs LitServe: pip install -e '.[serve]'") from err
    description = describe_model(ckpt_path, limits)  # fails here, before any process starts, if the checkpoint is bad
    source = open_source(ckpt_path)
    template = None if source.template is None else source.template.to_dict()
    gate = {"tokenizer_state": source.tokenizer.to_dict(), "limits": limits, "template_state": template,
            "model": str(ckpt_path)}  # fmt: skip
    cancel_dir = tempfile.mkdtemp(prefix="gpt-lightning-serve-")
    with StopSignals(on_stop=lambda: (Path(cancel_dir) / STOPPING).touch()) as stop:
        try:
            server = ls.LitServer(
                GPTStreamAPI(ckpt_path, cancel_dir),
                accelerator=accelerator,
                devices=1,
                workers_per_device=1,
                # LitServe's timeout limits only the time a request waits in its queue, and would end a stream
                # that waited behind long ones with a 504 after its "200 OK": the queue is bounded instead.
                timeout=False,
                # OpenAI's endpoints are the gate's, not LitServe's OpenAISpec: the spec serves /v1/chat/completions
                # alone (no /v1/completions) from a LitAPI of its own (a second worker and copy of the model beside
                # /predict's), refuses bad fields with FastAPI's 422s instead of OpenAI's errors, and ends every
                # answer with finish_reason "stop". In the gate, both share /predict's worker, queue, checks and stop.
                middlewares=[(RequestGate, {**gate, "cancel_dir": cancel_dir})],
            )
            server.uvicorn_graceful_timeout = STOP_TIMEOUT_S
            page = PAGE.read_text(encoding="utf-8")
            server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
            server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
            server.app.add_api_route("/model", lambda: JSONResponse(description), methods=["GET"])
            models = models_list(str(ckpt_path))
            server.app.add_api_route("/v1/models", lambda: JSONResponse(models), methods=["GET"])
            print(f"serving {ckpt_path} on http://{host}:{port}/ (POST /predict streams JSON lines; OpenAI's API is "
                  "under /v1; GET /model describes the model; /docs lists the API). Ctrl-C stops it.",
                  flush=True)  # fmt: skip
            # Warnings and errors only: uvicorn's and LitServe's start-up, access and shutdown lines tell the
            # user nothing that the line above and the one at the end do not.
            server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning")
        except KeyboardInterrupt:
            pass  # a signal during start-up, before LitServe listens for one: the processes end below
        finally:
            _end_child_processes()
            shutil.rmtree(cancel_dir, ignore_errors=True)
    by = f" by {stop.received.name}" if stop.received else ""
    print(f"stopped{by}: every process of the server has ended, and port {port} is free.", flush=True)
