"""What a request to `serve` may ask for, checked before it is queued: the server's limits, the error a refused
request is, POST /predict's request, and the text a worker request has the model read (no Lightning).

A worker request holds the sampling options (`SamplingOptions`' fields, checked and with the defaults filled in)
and one source of text: `prompt` (/predict's: one user message in a fine-tune's template), `messages` (a
conversation, in the template) or `text` (read as it is); `stop` optionally lists strings that end the answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gpt_lightning.data.instruct import Template, render_prompt
from gpt_lightning.sampling import DEFAULT_SAMPLING, SamplingOptionError, SamplingOptions, check_prompt
from gpt_lightning.tokenizer import Tokenizer

OPTIONS = tuple(field.name for field in dataclasses.fields(SamplingOptions))
FIELDS = ("prompt", *OPTIONS)
# A body may hold, besides the prompt, every option at its longest, with whitespace.
BODY_ROOM_BYTES = 4096

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

    @property
    def max_body_bytes(self) -> int:
        """The largest body a request within these limits can need: 12 bytes of JSON for each character of the
        prompt (one beyond the BMP, escaped as a surrogate pair, such as \\ud83d\\ude00), and room for the rest."""
        return 12 * self.max_prompt_chars + BODY_ROOM_BYTES

    def defaults(self) -> dict[str, Any]:
        """A request's options when it names none: generate's, with max_new_tokens cut to the server's limit."""
        return {**dataclasses.asdict(DEFAULT_SAMPLING),
                "max_new_tokens": min(DEFAULT_SAMPLING.max_new_tokens, self.max_new_tokens)}  # fmt: skip


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status and the field at fault."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field = status, field

    def to_dict(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}


def json_object(body: bytes, example: str) -> dict[str, Any]:
    """The JSON object `body` holds, or a 400 that shows an `example` of one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise RequestError(400, None, f"the body is not JSON ({reason}): send an object such as {example}.") from None
    if not isinstance(data, dict):
        raise RequestError(400, None, f"the body must be a JSON object such as {example}, not a {type(data).__name__}.")
    return data


def checked_options(given: Mapping[str, Any], limits: Limits) -> SamplingOptions:
    """The sampling options `given` ({SamplingOptions field: value}), checked by `SamplingOptions` within the
    server's limits, with the defaults filled in; a 422 naming the option otherwise."""
    try:
        options = SamplingOptions(**{**limits.defaults(), **given})
    except SamplingOptionError as err:
        raise RequestError(422, err.option, str(err)) from None
    if not 1 <= options.max_new_tokens <= limits.max_new_tokens:
        raise RequestError(422, "max_new_tokens", f"max_new_tokens must be an integer from 1 to "
                                                  f"{limits.max_new_tokens:,} (--max_new_tokens_limit), got "
                                                  f"{options.max_new_tokens}.")  # fmt: skip
    return options


def check_text(
    tokenizer: Tokenizer, text: str, limits: Limits, field: str, what: str | None = None, status: int = 422
) -> None:
    """A refusal (`status`) naming `field` unless the model can read `text` within --max_prompt_chars."""
    what = what or field
    if len(text) > limits.max_prompt_chars:
        raise RequestError(status, field, f"{what} has {len(text):,} characters, more than the limit of "
                                       f"{limits.max_prompt_chars:,}: shorten it.")  # fmt: skip
    try:
        check_prompt(tokenizer, text, what=what)
    except ValueError as err:
        raise RequestError(status, field, str(err)) from None


def model_input(template: Template | None, request: Mapping[str, Any]) -> str:
    """The text the model reads for a worker request (see the module's docstring)."""
    if "text" in request:
        return request["text"]
    return render_prompt(template, request["messages"] if "messages" in request else request["prompt"])


def parse_request(body: bytes, tokenizer: Tokenizer, limits: Limits) -> dict[str, Any]:
    """POST /predict's request in `body`: its prompt and its options, checked as `generate` checks them (the same
    `SamplingOptions` and `check_prompt`), within the server's limits, with the defaults filled in."""
    data = json_object(body, '{"prompt": "ROMEO:", "max_new_tokens": 100}')
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        shown = ", ".join(repr(name if len(name) <= 40 else name[:37] + "...") for name in unknown[:5])
        raise RequestError(422, unknown[0], f"unknown field(s) {shown}: the fields are {', '.join(FIELDS)}.")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(422, "prompt", "prompt must be a non-empty string: the text to continue.")
    check_text(tokenizer, prompt, limits, "prompt")
    options = checked_options({k: v for k, v in data.items() if k != "prompt"}, limits)
    return {"prompt": prompt, **dataclasses.asdict(options)}


async def respond(send: Send, status: int, content: dict[str, Any]) -> None:
    """Sends one JSON response."""
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
