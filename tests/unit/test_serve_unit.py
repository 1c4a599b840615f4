"""The server's parts in this process, without HTTP: the request gate (checks, body limit, queue slots) and the
worker's stream, on tiny character and BPE models, with a seeded fuzz of the sampling options. Whatever the gate
accepts streams text to its end or ends with an error line; whatever it refuses is a 4xx that names the field."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import make_play

pytest.importorskip("litserve", reason="the serve extra installs LitServe: pip install -e '.[serve]'")

from gpt_lightning.data.instruct import TEMPLATES, render_prompt  # noqa: E402
from gpt_lightning.model import GPT, GPTConfig  # noqa: E402
from gpt_lightning.sampling import SamplingOptions  # noqa: E402
from gpt_lightning.serving.openai_api import OpenAIRequest, Relay, error_body, parse_openai_request  # noqa: E402
from gpt_lightning.serving.requests import FIELDS, Limits, RequestError, parse_request  # noqa: E402
from gpt_lightning.serving.server import GPTStreamAPI, RequestGate  # noqa: E402
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer, Tokenizer  # noqa: E402

LIMITS = Limits(max_prompt_chars=64, max_new_tokens=8, max_queue=4)

# -- the fuzz -----------------------------------------------------------------------------------------------

# Pieces of odd text: lone and paired surrogates (both valid JSON), NUL, combining marks alone and after a letter,
# emoji and ZWJ sequences, a BOM, bidi and line-separator controls, the last code points, CJK, plain text.
ODD_TEXT = ["\ud800", "\udfff", "\udcff", "\ud83d\ude00", "😀", "\x00", "e\u0301", "\u0301", "👩\u200d👩\u200d👧",
            "\ufeff", "\u202e", "\u2028", "\U0010ffff", "\uffff", "東京", "\t", "\r\n"]  # fmt: skip
PLAIN_TEXT = ["KING", " ", "\n", "lord", "."]  # in a character model's vocabulary
ODD_VALUES: list[Any] = [0, 1, 2, -1, 0.0, -0.0, 1e-40, 5e-324, 1e-300, 1e300, 1.7e308, 10**30, 10**400, -(10**400),
                         float("nan"), float("inf"), float("-inf"), 0.5, 0.999999, 2**63, 2**64 - 1, 2**64, True,
                         False, None, "1", "", [], {}, [1], {"a": 1}]  # fmt: skip
PLAUSIBLE: dict[str, list[Any]] = {
    "max_new_tokens": [1, 3, 6],
    "temperature": [0, 0.8, 1e-40, 5e-324, 1e300, 2],
    "top_k": [None, 1, 5, 10**6],
    "top_p": [None, 1e-300, 0.5, 1],
    "seed": [0, 7, 2**64 - 1],
}
JUNK = [b"", b"{", b'{"prompt": "KI', b"[" * 5000, b"null", b"\xff\xfe\x00", b'{"prompt": NaN}', b"1e999999"]


def fuzzed_body(rng: random.Random) -> bytes:
    """One request body: mostly an object whose fields have random types and odd values, sometimes junk."""
    if rng.random() < 0.1:
        return rng.choice(JUNK)
    request: dict[str, Any] = {}
    if rng.random() < 0.9:
        pieces = [rng.choice(ODD_TEXT if rng.random() < 0.25 else PLAIN_TEXT) for _ in range(rng.randint(0, 5))]
        request["prompt"] = "".join(pieces) if rng.random() < 0.9 else rng.choice(ODD_VALUES)
    for field, plausible in PLAUSIBLE.items():
        if rng.random() < 0.7:
            request[field] = rng.choice(plausible) if rng.random() < 0.8 else rng.choice(ODD_VALUES)
    if rng.random() < 0.05:
        request["colour"] = "red"
    text = json.dumps(request, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate, unescaped, is bytes that are not UTF-8


# -- tiny models --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.from_text(make_play(50))


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BPETokenizer:
    pytest.importorskip("tokenizers", reason="the hf extra installs tokenizers")
    from tests.unit.test_hf import train_bpe

    return BPETokenizer.from_file(train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json"))


def worker(tokenizer: Tokenizer, cancel_dir: Path) -> GPTStreamAPI:
    """The worker's API as LitServe's setup leaves it, with a tiny random model instead of a checkpoint's."""
    torch.manual_seed(0)
    api = GPTStreamAPI(ckpt_path="(a tiny random model)", cancel_dir=str(cancel_dir))
    api.gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    api.tokenizer, api.device, api.template = tokenizer, torch.device("cpu"), None
    return api


def stream(api: GPTStreamAPI, request: dict[str, Any]) -> list[dict[str, Any]]:
    return list(api.encode_response(api.predict({**request, "stream_id": uuid.uuid4().hex})))


def assert_streamed_to_the_end(messages: list[dict[str, Any]], request: dict[str, Any]) -> None:
    assert messages and messages[-1].get("done") is True, (request, messages[-3:])
    assert sum(len(m["text"]) for m in messages) == messages[-1]["characters"]
    for message in messages:
        json.dumps(message)  # what LitServe sends: every message is JSON


@pytest.mark.parametrize("kind", ["characters", "BPE"])
def test_fuzzed_requests_are_refused_with_a_4xx_or_stream_to_the_end(kind, char_tokenizer, bpe_tokenizer, tmp_path):
    tokenizer = char_tokenizer if kind == "characters" else bpe_tokenizer
    api = worker(tokenizer, tmp_path)
    rng = random.Random(f"fuzz {kind}")
    refused, streamed = 0, 0
    for _ in range(1000):
        body = fuzzed_body(rng)
        try:
            request = parse_request(body, tokenizer, LIMITS)
        except RequestError as err:
            refused += 1
            error = json.loads(json.dumps(err.to_dict()))
            assert err.status in (400, 413, 422) and error["field"] in (*FIELDS, "colour", None), (body[:200], error)
            assert error["error"] and "\n" not in error["error"], (body[:200], error)
            continue
        streamed += 1
        assert_streamed_to_the_end(stream(api, request), request)
    assert refused > 100 and streamed > 100, (refused, streamed)  # the fuzz reached both sides of the gate


def test_a_request_the_gate_accepts_is_the_same_sampling_options_the_worker_runs(char_tokenizer):
    body = b'{"prompt": "KING", "temperature": 1, "top_p": 1, "seed": 3}'
    request = parse_request(body, char_tokenizer, LIMITS)
    expected = SamplingOptions(max_new_tokens=LIMITS.max_new_tokens, temperature=1.0, top_p=1.0, seed=3)
    assert request == {"prompt": "KING", **vars(expected)}
    assert isinstance(request["temperature"], float)  # 1 and 1.0 sample alike: generate's --temperature 1 is 1.0
    # Unset, max_new_tokens is generate's default, or the server's limit where that is lower.
    assert parse_request(b'{"prompt": "KING"}', char_tokenizer, Limits())["max_new_tokens"] == 500
    assert parse_request(b'{"prompt": "KING"}', char_tokenizer, LIMITS)["max_new_tokens"] == LIMITS.max_new_tokens


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"prompt": "KING", "top_k": ' + b"[" * 100_000 + b"}"],
                         ids=["a deep array", "a deep value"])  # fmt: skip
def test_deeply_nested_json_is_the_400_of_malformed_json(body, char_tokenizer):
    with pytest.raises(RequestError, match="the body is not JSON") as raised:
        parse_request(body, char_tokenizer, LIMITS)
    assert raised.value.status == 400 and raised.value.field is None


def test_a_worker_that_fails_mid_stream_ends_it_with_an_error_line(char_tokenizer, tmp_path, monkeypatch, caplog):
    import gpt_lightning.serving.server as serve

    def failing(*args: Any, **kwargs: Any) -> Iterator[str]:
        yield "KI"
        raise RuntimeError("boom")

    monkeypatch.setattr(serve, "stream_text", failing)
    messages = stream(worker(char_tokenizer, tmp_path), parse_request(b'{"prompt": "KING"}', char_tokenizer, LIMITS))
    assert messages[0] == {"text": "KI"} and messages[-1]["field"] is None
    assert "generation failed" in messages[-1]["error"] and "boom" in messages[-1]["error"]
    assert "Traceback" in caplog.text and "boom" in caplog.text  # the details stay in the server's log


# -- the gate, as ASGI ----------------------------------------------------------------------------------------


class Client:
    """One client of the gate: its body in chunks (each after `delay` seconds), and what the gate sent back."""

    def __init__(self, chunks: list[bytes], delay: float = 0.0, content_length: bool = True,
                 disconnect: bool = False, path: str = "/predict") -> None:  # fmt: skip
        self.chunks, self.delay, self.disconnect = chunks, delay, disconnect
        length = [(b"content-length", str(sum(map(len, chunks))).encode())] if content_length else []
        self.scope = {"type": "http", "path": path, "method": "POST",
                      "headers": [(b"content-type", b"application/json"), *length]}  # fmt: skip
        self.reads, self.status, self.body, self.headers = 0, 0, b"", {}

    async def receive(self) -> dict[str, Any]:
        if self.reads < len(self.chunks):
            await asyncio.sleep(self.delay)
            self.reads += 1
            if self.disconnect and self.reads == len(self.chunks):
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": self.chunks[self.reads - 1],
                    "more_body": self.reads < len(self.chunks)}  # fmt: skip
        await asyncio.Event().wait()  # connected, and silent
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status, self.headers = message["status"], dict(message["headers"])
        else:
            self.body += message.get("body", b"")


async def streaming_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """LitServe's part, as the gate sees it: reads the forwarded request, streams for a while."""
    forwarded = json.loads((await receive())["body"])
    if forwarded["prompt"] == "RAISE":
        raise RuntimeError("the app failed")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b'{"text": "", "done": true}\n', "more_body": False})


def gate(tokenizer: CharTokenizer, tmp_path: Path, max_queue: int) -> RequestGate:
    limits = Limits(max_prompt_chars=LIMITS.max_prompt_chars, max_new_tokens=8, max_queue=max_queue)
    return RequestGate(streaming_app, tokenizer.to_dict(), limits, str(tmp_path))


async def call(gate: RequestGate, *clients: Client) -> None:
    await asyncio.gather(*(gate(c.scope, c.receive, c.send) for c in clients))


def test_slow_bodies_cannot_pass_the_queue_limit(char_tokenizer, tmp_path):
    # The slot is taken before the body is read: clients whose bodies come late cannot all pass a count of 0.
    the_gate = gate(char_tokenizer, tmp_path, max_queue=1)
    clients = [Client([b'{"prompt": "KING", ', b'"max_new_tokens": 3}'], delay=0.1) for _ in range(5)]
    asyncio.run(call(the_gate, *clients))
    assert sorted(c.status for c in clients) == [200, 503, 503, 503, 503]
    assert all(b"busy" in c.body for c in clients if c.status == 503) and the_gate.in_flight == 0


def test_the_body_limit_is_a_413_read_no_further_than_the_limit(char_tokenizer, tmp_path):
    the_gate = gate(char_tokenizer, tmp_path, max_queue=1)
    cap = LIMITS.max_body_bytes
    announced = Client([b'{"prompt": "' + b"K" * cap + b'"}'])
    chunked = Client([b'{"prompt": "'] + [b"K" * 1000] * (10 * cap // 1000) + [b'"}'], content_length=False)
    asyncio.run(call(the_gate, announced))
    asyncio.run(call(the_gate, chunked))
    for client in (announced, chunked):
        error = json.loads(client.body)
        assert client.status == 413 and error["field"] is None and "--max_prompt_chars" in error["error"], error
    assert announced.reads == 0  # its Content-Length said enough
    assert chunked.reads <= cap // 1000 + 2  # read up to the limit, and no further
    assert the_gate.in_flight == 0


def test_the_limit_leaves_room_for_the_longest_prompt_escaped_and_every_field(char_tokenizer, tmp_path):
    # Each emoji is one character and, escaped as a surrogate pair, 12 bytes of JSON: the worst case per character.
    longest = {"prompt": "😀" * LIMITS.max_prompt_chars, "max_new_tokens": 8, "temperature": 1.2345678901234567e-300,
               "top_k": 10**18, "top_p": 0.12345678901234567, "seed": 2**64 - 1}  # fmt: skip
    client = Client([json.dumps(longest, indent=4).encode()])
    asyncio.run(call(gate(char_tokenizer, tmp_path, max_queue=1), client))
    assert client.status == 422 and json.loads(client.body)["field"] == "prompt"  # outside the vocabulary, not 413


@pytest.mark.parametrize(
    "client, status",
    [
        (Client([b'{"prompt": "KING"}']), 200),  # max_new_tokens: generate's default, cut to the server's limit
        (Client([b'{"prompt": "KI', b'NG"}'], disconnect=True), None),  # the client left while sending
        (Client([b'{"prompt": "KING"']), 400),
        (Client([b'{"prompt": ""}']), 422),
        (Client([b"K" * (LIMITS.max_body_bytes + 1)]), 413),
        (Client([b'{"prompt": "RAISE"}']), RuntimeError),
    ],
    ids=["streamed", "disconnected while sending", "malformed", "refused", "too large", "the app raised"],
)
def test_the_queue_slot_is_released_on_every_path(client, status, tmp_path):
    the_gate = gate(CharTokenizer.from_text("KINGRASE"), tmp_path, max_queue=1)
    if status is RuntimeError:
        with pytest.raises(RuntimeError, match="the app failed"):
            asyncio.run(call(the_gate, client))
    else:
        asyncio.run(call(the_gate, client))
        assert client.status == (status or 0)
    assert the_gate.in_flight == 0
    after = Client([b'{"prompt": "KING"}'])
    asyncio.run(call(the_gate, after))
    assert after.status == 200


def test_a_fine_tunes_streams_answer_in_its_template_and_end_at_its_marker(tmp_path):
    # A model that always predicts "$", the plain template's end marker: ln_f outputs its bias, and only the
    # head row of "$" reads it. A fine-tune's stream stops before the marker at once; a base model's runs on.
    from gpt_lightning.data.instruct import TEMPLATES

    tokenizer = CharTokenizer("\n $:ABQaehlo")
    api = worker(tokenizer, tmp_path)
    api.gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8,
                            bias=True, tie_embeddings=False)).eval()  # fmt: skip
    with torch.no_grad():
        api.gpt.ln_f.weight.zero_()
        api.gpt.ln_f.bias.fill_(1.0)
        api.gpt.lm_head.weight.zero_()
        api.gpt.lm_head.weight[tokenizer.encode("$")[0]] = 10.0
    request = {**SamplingOptions(max_new_tokens=5, temperature=0).__dict__, "prompt": "hello"}
    assert "".join(m["text"] for m in stream(api, request)) == "$$$$$"
    api.template = TEMPLATES["plain"]
    messages = stream(api, request)
    assert messages[-1]["done"] and messages[-1]["characters"] == 0  # the answer ended where it began
    assert messages[-1]["finish_reason"] == "stop"
    conversation = stream(api, {**request, "messages": [{"role": "user", "content": "hello"}]})
    assert conversation[-1]["characters"] == 0  # a conversation (/v1/chat/completions) is read in the template too
    # Text read as it is (/v1/completions) runs on, as `generate --raw true` does, unless it names a stop.
    assert "".join(m["text"] for m in stream(api, {**request, "text": "hello"})) == "$$$$$"
    assert stream(api, {**request, "text": "hello", "stop": ["$"]})[-1]["characters"] == 0


# -- OpenAI's API ---------------------------------------------------------------------------------------------

CHAT = TEMPLATES["chat"]
KING = [{"role": "user", "content": "KING"}]


@pytest.fixture(scope="module")
def chat_tokenizer() -> CharTokenizer:
    return CharTokenizer.from_text(make_play(50) + CHAT.markers)


def openai_request(kind: str, body: dict | bytes, tokenizer: Tokenizer) -> OpenAIRequest:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_openai_request(kind, data, tokenizer, CHAT, LIMITS, "the served model")  # type: ignore[arg-type]


def chat_worker(tokenizer: Tokenizer, cancel_dir: Path) -> GPTStreamAPI:
    api = worker(tokenizer, cancel_dir)
    api.template = CHAT
    return api


def test_an_openai_request_is_a_predict_request_with_predicts_checks_and_defaults(chat_tokenizer):
    completion = openai_request("completions", {"model": "m", "prompt": ["KING"], "max_tokens": 3, "temperature": 0,
                                                "seed": 5, "stop": "\n", "user": "u", "frequency_penalty": 0,
                                                "logprobs": None, "n": 1}, chat_tokenizer)  # fmt: skip
    assert completion.model == "m" and not completion.stream and not completion.include_usage
    assert completion.worker == {"text": "KING", "stop": ["\n"],
                                 **vars(SamplingOptions(max_new_tokens=3, temperature=0, seed=5))}  # fmt: skip
    # Unset or null, an option takes /predict's default (Limits.defaults: generate's, within the server's limit).
    system = {"role": "system", "content": "Be brief."}
    parts = {"role": "user", "content": [{"type": "text", "text": "KI"}, {"type": "text", "text": "NG"}]}
    chat = openai_request("chat", {"messages": [system, parts], "temperature": None, "stream": True,
                                   "stream_options": {"include_usage": True}}, chat_tokenizer)  # fmt: skip
    assert chat.model == "the served model" and chat.stream and chat.include_usage
    predict = parse_request(b'{"prompt": "KING"}', chat_tokenizer, LIMITS)
    assert chat.worker == {"messages": [system, *KING], **{k: v for k, v in predict.items() if k != "prompt"}}
    assert openai_request("chat", {"messages": KING, "max_completion_tokens": 2}, chat_tokenizer).worker[
        "max_new_tokens"] == 2  # fmt: skip


LONG_CHAT = [{"role": "user", "content": "K" * 40}]  # 71 characters in the template: over LIMITS' 64


@pytest.mark.parametrize(
    "kind, body, param, message",
    [
        ("completions", b'{"prompt": "KI', None, "the body is not JSON"),
        ("completions", b'["KING"]', None, "must be a JSON object"),
        ("completions", {"prompt": "KING", "n": 2}, "n", "n must be 1, got 2: this server generates one choice"),
        ("completions", {"prompt": "KING", "frequency_penalty": 0.5}, "frequency_penalty",
         r"frequency_penalty is not supported by this server, only its default \(0\): drop it"),
        ("completions", {"prompt": "KING", "logprobs": 0}, "logprobs", "not supported"),
        ("completions", {"prompt": "KING", "tools": []}, "tools", "not an option this server supports: it takes"),
        ("completions", {"messages": KING}, "messages", "messages is the text of /v1/chat/completions"),
        ("chat", {"prompt": "KING"}, "prompt", "prompt is the text of /v1/completions: this endpoint takes messages"),
        ("completions", {"prompt": ""}, "prompt", "non-empty string"),
        ("completions", {"prompt": [1, 2]}, "prompt", "non-empty string"),
        ("completions", {"prompt": "KING 東京"}, "prompt", "outside the model's"),
        ("completions", {"prompt": "K" * 65}, "prompt", "65 characters, more than the limit of 64"),
        ("completions", {"prompt": "KING", "max_tokens": 9}, "max_tokens",
         r"max_tokens must be an integer from 1 to 8 \(the server's --max_new_tokens_limit\), got 9"),
        ("completions", {"prompt": "KING", "max_tokens": "ten"}, "max_tokens", "max_tokens must be an integer"),
        ("chat", {"messages": KING, "max_completion_tokens": 0}, "max_completion_tokens",
         "max_completion_tokens must be an integer from 1"),
        ("chat", {"messages": KING, "max_tokens": 2, "max_completion_tokens": 2}, "max_completion_tokens",
         "give one of"),
        ("completions", {"prompt": "KING", "temperature": -1}, "temperature", "temperature must be >= 0"),
        ("chat", {"messages": KING, "top_p": 0}, "top_p", r"\(0, 1\]"),
        ("completions", {"prompt": "KING", "seed": -1}, "seed", "seed must be"),
        ("completions", {"prompt": "KING", "stop": ["a"] * 5}, "stop", "a list of 1 to 4"),
        ("completions", {"prompt": "KING", "stop": [""]}, "stop", "non-empty string"),
        ("completions", {"prompt": "KING", "stream": "yes"}, "stream", "true or false"),
        ("completions", {"prompt": "KING", "stream_options": {"include_usage": True}}, "stream_options",
         "for streams only"),
        ("completions", {"prompt": "KING", "model": 3}, "model", "must be a string"),
        ("chat", {"messages": []}, "messages", "non-empty list"),
        ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages", 'role "tool": a role is one of'),
        ("chat", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages",
         "must be an object with a role and a content"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
         "a string or a list of"),
        ("chat", {"messages": [*KING, {"role": "assistant", "content": "A"}]}, "messages",
         "the last message is the assistant's"),
        ("chat", {"messages": [{"role": "user", "content": "東京"}]}, "messages", "outside the model's"),
        ("chat", {"messages": LONG_CHAT}, "messages", "the conversation, in the model's template, has 71 characters"),
    ],
)  # fmt: skip
def test_a_bad_openai_request_is_a_400_in_openais_error_shape_naming_the_option(kind, body, param, message,
                                                                                 chat_tokenizer):  # fmt: skip
    import re

    with pytest.raises(RequestError) as raised:
        openai_request(kind, body, chat_tokenizer)
    err = raised.value
    assert err.status == 400 and re.search(message, str(err)), str(err)
    assert error_body(err) == {"error": {"message": str(err), "type": "invalid_request_error", "param": param,
                                         "code": None}}  # fmt: skip


def test_the_worker_reads_a_conversation_in_its_template_text_as_it_is_and_says_why_it_ended(chat_tokenizer, tmp_path):
    api = chat_worker(chat_tokenizer, tmp_path)
    options = vars(SamplingOptions(max_new_tokens=8, temperature=0))
    sources = [{"prompt": "KING"}, {"messages": KING}, {"text": render_prompt(CHAT, "KING")}]
    answers = [stream(api, {**source, **options}) for source in sources]
    texts = {"".join(m["text"] for m in answer) for answer in answers}
    assert len(texts) == 1 and len(text := texts.pop()) == 8
    done = {"text": "", "done": True, "characters": 8, "finish_reason": "length",
            "prompt_tokens": len(render_prompt(CHAT, "KING")), "completion_tokens": 8}  # fmt: skip
    assert all(answer[-1] == done for answer in answers)
    stopped = stream(api, {"messages": KING, **options, "stop": [text[3:5]]})
    assert "".join(m["text"] for m in stopped) == text[: text.find(text[3:5])]
    assert stopped[-1]["finish_reason"] == "stop"


def sse_events(data: bytes) -> list[dict[str, Any]]:
    """The JSON events of a server-sent stream, which must end in `data: [DONE]`."""
    *blocks, rest = data.decode().split("\n\n")
    assert rest == "" and all(block.startswith("data: ") for block in blocks), data[-300:]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(block.removeprefix("data: ")) for block in blocks[:-1]]


def test_the_relay_gives_the_workers_stream_as_openai_chunks_or_one_object(chat_tokenizer, tmp_path):
    api = chat_worker(chat_tokenizer, tmp_path)
    body = {"model": "m", "messages": KING, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    request = openai_request("chat", body, chat_tokenizer)
    lines = b"".join(json.dumps(m).encode() + b"\n" for m in stream(api, request.worker))
    relay = Relay(request, "abc")
    pieces = [relay.feed(lines[i : i + 7]) for i in range(0, len(lines), 7)]  # pieces that split lines
    chunks = sse_events(relay.opening() + b"".join(pieces) + relay.close())
    assert {(c["id"], c["object"], c["model"]) for c in chunks} == {("chatcmpl-abc", "chat.completion.chunk", "m")}
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]  # fmt: skip
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    as_predict = {k: v for k, v in request.worker.items() if k != "messages"} | {"prompt": "KING"}
    predicted = stream(api, as_predict)  # what /predict streams for the same options
    assert len(text) == 8 and text == "".join(m["text"] for m in predicted)
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(render_prompt(CHAT, "KING"))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    whole = Relay(dataclasses.replace(request, stream=False, include_usage=False), "abc")
    assert whole.feed(lines) == b""
    status, answer = whole.result(stopping=False)
    assert status == 200 and answer["object"] == "chat.completion" and answer["usage"] == usage
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                  "finish_reason": "length"}]  # fmt: skip


def test_a_worker_stream_that_ends_in_an_error_line_ends_the_answer_with_openais_error(chat_tokenizer):
    request = openai_request("completions", {"prompt": "KING", "stream": True}, chat_tokenizer)
    lines = b'{"text": "KI"}\n{"error": "the server is stopping: try again.", "field": null}\n'
    relay = Relay(request, "abc")
    events = sse_events(relay.feed(lines) + relay.close())
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["KI"] and events[0]["object"] == "text_completion"
    assert events[-1] == {"error": {"message": "the server is stopping: try again.", "type": "server_error",
                                    "param": None, "code": None}}  # fmt: skip
    for stopping, status in ((True, 503), (False, 500)):
        whole = Relay(dataclasses.replace(request, stream=False), "abc")
        whole.feed(lines)
        assert whole.result(stopping)[0] == status


async def worker_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """LitServe's part for OpenAI's requests, as the gate sees it: /predict's lines, in two pieces."""
    assert scope["path"] == "/predict" and "messages" in json.loads((await receive())["body"])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b'{"text": "KI"}\n', "more_body": True})
    done = {"text": "", "done": True, "characters": 4, "finish_reason": "stop", "prompt_tokens": 3,
            "completion_tokens": 2}  # fmt: skip
    await send({"type": "http.response.body", "body": b'{"text": "NG"}\n' + json.dumps(done).encode() + b"\n",
                "more_body": True})  # fmt: skip
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def test_the_gate_answers_openais_paths_in_openais_format(chat_tokenizer, tmp_path):
    body = json.dumps({"messages": KING, "max_tokens": 2}).encode()
    on_a_base_model = Client([body], path="/v1/chat/completions")
    asyncio.run(call(RequestGate(worker_app, chat_tokenizer.to_dict(), LIMITS, str(tmp_path)), on_a_base_model))
    error = json.loads(on_a_base_model.body)["error"]
    assert on_a_base_model.status == 404 and error["param"] == "model" and on_a_base_model.reads == 0
    assert "not a chat model" in error["message"] and "/v1/completions" in error["message"]
    the_gate = RequestGate(worker_app, chat_tokenizer.to_dict(), LIMITS, str(tmp_path), CHAT.to_dict(), "m")
    whole = Client([body], path="/v1/chat/completions")
    streamed = Client([body[:-1] + b', "stream": true}'], path="/v1/chat/completions")
    asyncio.run(call(the_gate, whole))
    asyncio.run(call(the_gate, streamed))
    answer = json.loads(whole.body)
    assert whole.status == 200 and whole.headers[b"content-type"] == b"application/json"
    assert answer["choices"][0]["message"]["content"] == "KING" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert streamed.status == 200 and streamed.headers[b"content-type"].startswith(b"text/event-stream")
    deltas = [e["choices"][0]["delta"] for e in sse_events(streamed.body)]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "KI"}, {"content": "NG"}, {}]
    the_gate.in_flight = LIMITS.max_queue  # busy: a 503 in OpenAI's shape here, in /predict's there
    busy, predict = Client([body], path="/v1/chat/completions"), Client([b'{"prompt": "KING"}'])
    asyncio.run(call(the_gate, busy, predict))
    assert busy.status == predict.status == 503
    assert json.loads(busy.body)["error"]["type"] == "server_error" and "busy" in json.loads(predict.body)["error"]
