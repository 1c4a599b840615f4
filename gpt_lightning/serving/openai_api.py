"""The OpenAI-compatible API of `serve`, in OpenAI's wire format (no Lightning):

    POST /v1/completions        every model: the prompt is read as it is, with no template
    POST /v1/chat/completions   a chat model (a fine-tune in a template that marks every role): the conversation
                                is read in its template, and the answer ends at its end marker
    GET  /v1/models             the one model served

`parse_openai_request` turns a request into a worker request (`serve_requests`), checked by the same code as
/predict's, and `Relay` turns the worker's stream of JSON lines back into OpenAI's answer: one JSON object, or
server-sent events (`data: {...}`) ending in `data: [DONE]`. A refusal is OpenAI's error object,
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from gpt_lightning.data.corpus import brief
from gpt_lightning.data.instruct import ROLES, Template
from gpt_lightning.sampling import SamplingOptions
from gpt_lightning.serving.requests import (
    Limits,
    Message,
    RequestError,
    Send,
    check_text,
    checked_options,
    json_object,
    model_input,
    respond,
)
from gpt_lightning.tokenizer import Tokenizer

Kind = Literal["completions", "chat"]
ROUTES: dict[str, Kind] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
PATHS = {kind: path for path, kind in ROUTES.items()}
SOURCE = {"completions": "prompt", "chat": "messages"}  # each endpoint's text
# Both endpoints' options; top_k is ours (vLLM takes it too), user is OpenAI's end-user id, taken and unused.
COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
          "user")  # fmt: skip
TAKEN: dict[Kind, tuple[str, ...]] = {"completions": ("prompt", *COMMON),
                                      "chat": ("messages", "max_completion_tokens", *COMMON)}  # fmt: skip
# OpenAI options this server has no use for, taken at the value that turns them off (clients send them so);
# any other value is a 400 that names the option.
OFF: dict[str, Any] = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "logit_bias": {},
                       "echo": False, "best_of": 1}  # fmt: skip
SAMPLING = ("temperature", "top_p", "top_k", "seed")  # named as in SamplingOptions
MAX_STOPS = 4  # as OpenAI
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    """A checked OpenAI request: what the worker runs, and how its answer is to be shaped."""

    kind: Kind
    model: str  # echoed in the answer
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    worker: dict[str, Any]  # the worker request (serve_requests' module docstring)


def error_body(err: RequestError) -> dict[str, Any]:
    """OpenAI's error object for a refusal."""
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return {"error": {"message": str(err), "type": kind, "param": err.field, "code": None}}


def is_chat_model(template: Template | None) -> bool:
    return template is not None and template.is_chat


def not_a_chat_model(template: Template | None) -> RequestError:
    """The 404 of /v1/chat/completions on a model that is not a chat model (as OpenAI answers it)."""
    if template is None:
        why = "was not fine-tuned on task data, so it has no chat template"
    else:
        why = f"was fine-tuned in the {template.name!r} template, which does not mark every role ({', '.join(ROLES)})"
    return RequestError(404, "model", f"this model {why}: it is not a chat model. Send the text to continue to "
                                      "/v1/completions instead, or fine-tune it on chat data with --data.template "
                                      "chat (docs/fine-tuning.md).")  # fmt: skip


def parse_openai_request(
    kind: Kind, body: bytes, tokenizer: Tokenizer, template: Template | None, limits: Limits, model: str
) -> OpenAIRequest:
    """The request of `kind` in `body`, checked as /predict's is (`checked_options`, `check_text`), within the
    server's limits: a 400 naming the option otherwise. A null is an option left unset; `model` is the name
    echoed when the request names none."""
    data = json_object(body, _EXAMPLES[kind])
    _refuse_unknown(kind, data)
    given = {name: value for name, value in data.items() if value is not None}
    name = given.get("model", model)
    if not isinstance(name, str):
        raise RequestError(400, "model", f"model must be a string (the name echoed in the answer), got {brief(name)}.")
    if given.get("n", 1) != 1 or isinstance(given.get("n"), bool):
        raise RequestError(400, "n", f"n must be 1, got {brief(given['n'])}: this server generates one choice a "
                                     "request. Send several requests, each with its own seed.")  # fmt: skip
    stream = given.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream", f"stream must be true or false, got {brief(stream)}.")
    include_usage = _include_usage(given.get("stream_options"), stream)
    worker: dict[str, Any]
    if kind == "completions":
        worker = {"text": _prompt(given.get("prompt"))}
        check_text(tokenizer, worker["text"], limits, "prompt", status=400)
    else:
        worker = {"messages": _messages(given.get("messages"))}
        check_text(tokenizer, model_input(template, worker), limits, "messages",
                   "the conversation, in the model's template,", status=400)  # fmt: skip
    if "stop" in given:
        worker["stop"] = _stops(given["stop"])
    worker.update(dataclasses.asdict(_options(given, limits)))
    return OpenAIRequest(kind, name, stream, include_usage, worker)


_EXAMPLES = {"completions": '{"prompt": "ROMEO:", "max_tokens": 100}',
             "chat": '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100}'}  # fmt: skip


def _refuse_unknown(kind: Kind, data: Mapping[str, Any]) -> None:
    taken = TAKEN[kind]
    for name, value in data.items():
        if name in taken:
            continue
        if name in OFF:
            if value is None or (isinstance(value, bool) == isinstance(OFF[name], bool) and value == OFF[name]):
                continue
            raise RequestError(400, name, f"{name} is not supported by this server, only its default "
                                          f"({json.dumps(OFF[name])}): drop it.")  # fmt: skip
        other: Kind = "chat" if kind == "completions" else "completions"
        if name == SOURCE[other]:
            raise RequestError(400, name, f"{name} is the text of {PATHS[other]}: this endpoint takes {SOURCE[kind]}.")
        raise RequestError(400, name, f"{brief(name)} is not an option this server supports: it takes "
                                      f"{', '.join(taken)} (docs/serving.md).")  # fmt: skip


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise RequestError(400, "stream_options", "stream_options is for streams only: set stream to true, or drop it.")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError(400, "stream_options", f'stream_options takes {{"include_usage": true}} only, got '
                                                  f"{brief(options)}.")  # fmt: skip
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError(400, "stream_options", f"stream_options.include_usage must be true or false, got "
                                                  f"{brief(include)}.")  # fmt: skip
    return include


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        raise RequestError(400, "prompt", f"prompt must be a non-empty string (or a list of one), the text to "
                                          f"continue; got {brief(value)}.")  # fmt: skip
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError(400, "messages", f"messages must be a non-empty list of {{role, content}} objects, got "
                                            f"{brief(value)}.")  # fmt: skip
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or set(message) - {"role", "content", "name"}:
            raise RequestError(400, "messages", f"message {i} must be an object with a role and a content (and "
                                                f"optionally a name), got {brief(message)}.")  # fmt: skip
        if message["role"] not in ROLES:
            raise RequestError(400, "messages", f"message {i} has role {brief(message['role'])}: a role is one of "
                                                f"{', '.join(ROLES)}.")  # fmt: skip
        messages.append({"role": message["role"], "content": _content(message.get("content"), i)})
    if messages[-1]["role"] == "assistant":
        raise RequestError(400, "messages", "the last message is the assistant's: end the conversation with the "
                                            "message to answer (a user's).")  # fmt: skip
    return messages


def _content(value: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts, joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(_is_text_part(part) for part in value):
        return "".join(part["text"] for part in value)
    raise RequestError(400, "messages", f"message {i}'s content must be a string or a list of "
                                        f'{{"type": "text", "text": ...}} parts, got {brief(value)}.')  # fmt: skip


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _stops(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not (isinstance(stops, list) and 1 <= len(stops) <= MAX_STOPS and all(isinstance(s, str) and s for s in stops)):
        raise RequestError(400, "stop", f"stop must be a non-empty string or a list of 1 to {MAX_STOPS} of them, "
                                        f"got {brief(value)}.")  # fmt: skip
    return stops


def _options(given: Mapping[str, Any], limits: Limits) -> SamplingOptions:
    """`checked_options` on the request's sampling options, its errors in OpenAI's names and status."""
    lengths = [name for name in ("max_tokens", "max_completion_tokens") if name in given]
    if len(lengths) > 1:
        raise RequestError(400, lengths[1], "give one of max_tokens and max_completion_tokens (the same limit).")
    names = {name: name for name in SAMPLING} | ({lengths[0]: "max_new_tokens"} if lengths else {})
    try:
        return checked_options({ours: given[theirs] for theirs, ours in names.items() if theirs in given}, limits)
    except RequestError as err:
        theirs = next((t for t, ours in names.items() if ours == err.field), lengths[0] if lengths else "max_tokens")
        message = str(err)
        if err.field is not None and message.startswith(err.field):  # SamplingOptions' messages begin with its name
            message = theirs + message[len(err.field) :]
        message = message.replace("(--max_new_tokens_limit)", "(the server's --max_new_tokens_limit)")
        raise RequestError(400, theirs, message) from None


# -- the answer ------------------------------------------------------------------------------------------------


class Relay:
    """Turns the worker's stream (/predict's JSON lines: {"text"}, then {"done", "finish_reason", "prompt_tokens",
    "completion_tokens"} or {"error"}) into the answer to `request`: server-sent events as the lines come
    (`feed`, then `close`) or, for a request that does not stream, one JSON object at the end (`result`)."""

    def __init__(self, request: OpenAIRequest, stream_id: str) -> None:
        self.request = request
        prefix = "cmpl" if request.kind == "completions" else "chatcmpl"
        self.head = {"id": f"{prefix}-{stream_id}", "object": "", "created": int(time.time()), "model": request.model}
        self.pending = b""
        self.texts: list[str] = []
        self.done: dict[str, Any] | None = None
        self.error: str | None = None

    def opening(self) -> bytes:
        """The events before any text: the assistant's role, for a chat."""
        if self.request.kind != "chat":
            return b""
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])  # fmt: skip

    def feed(self, data: bytes) -> bytes:
        """Reads a piece of the worker's stream; returns the events it makes (nothing, unless streaming)."""
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        events = []
        for line in filter(None, (line.strip() for line in lines)):
            message = json.loads(line)
            if "error" in message:
                self.error = message["error"]
            elif message.get("done"):
                self.done = message
            elif message["text"]:
                self.texts.append(message["text"])
                events.append(self._event([self._choice(message["text"], None)]))
        return b"".join(events) if self.request.stream else b""

    def close(self) -> bytes:
        """The last events of a stream: its finish reason (and usage), or its error; then [DONE]."""
        last = [self.feed(b"\n")]
        if self.done is None:
            error = RequestError(500, None, self.error or "the stream ended early: the server's log has the details.")
            last.append(_sse(error_body(error)))
        else:
            last.append(self._event([self._choice("", self.done["finish_reason"])]))
            if self.request.include_usage:
                last.append(self._event([], usage=self._usage()))
        return b"".join(last) + b"data: [DONE]\n\n"

    def result(self, stopping: bool) -> tuple[int, dict[str, Any]]:
        """The status and JSON answer of a request that does not stream, once the worker's stream has ended."""
        self.feed(b"\n")
        if self.done is None:
            status = 503 if stopping else 500
            return status, error_body(RequestError(status, None, self.error or "the stream ended early."))
        text = "".join(self.texts)
        if self.request.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.done["finish_reason"]}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.done["finish_reason"]}
        return 200, {**self.head, "object": _OBJECTS[self.request.kind], "choices": [choice], "usage": self._usage()}

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.request.kind == "chat":
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish_reason}  # fmt: skip
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _usage(self) -> dict[str, int]:
        assert self.done is not None
        prompt, completion = self.done["prompt_tokens"], self.done["completion_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = "text_completion" if self.request.kind == "completions" else "chat.completion.chunk"
        return _sse({**self.head, "object": chunk, "choices": choices, **extra})


_OBJECTS = {"completions": "text_completion", "chat": "chat.completion"}


def relayed(request: OpenAIRequest, stream_id: str, send: Send, stopping: Callable[[], bool]) -> Send:
    """An ASGI `send` that gives the client, through a `Relay`, what LitServe sends it as /predict's answer.
    `stopping()` says whether the server is stopping, which an answer that does not stream says with a 503."""
    relay, status, failure = Relay(request, stream_id), 200, b""

    async def relaying(message: Message) -> None:
        nonlocal status, failure
        if message["type"] == "http.response.start":
            status = message["status"]
            if status == 200 and request.stream:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                await send({"type": "http.response.body", "body": relay.opening(), "more_body": True})
            return
        body, more = message.get("body", b""), message.get("more_body", False)
        if status != 200:  # LitServe's own error, not a line of the worker's
            failure += body
            if not more:
                shown = failure.decode(errors="replace")[:200]
                await respond(send, status, error_body(RequestError(status, None, f"the server failed: {shown}")))
        elif request.stream:
            events = relay.feed(body) + (b"" if more else relay.close())
            if events or not more:
                await send({"type": "http.response.body", "body": events, "more_body": more})
        else:
            relay.feed(body)
            if not more:
                await respond(send, *relay.result(stopping()))

    return relaying


def _sse(content: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(content).encode() + b"\n\n"


def models_list(model: str) -> dict[str, Any]:
    """GET /v1/models: the one model served."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "gpt-lightning"}]}
