"""The server's parts in this process, without HTTP: the request gate (checks, body limit, queue slots) and the
worker's stream, on tiny character and BPE models, with a seeded fuzz of the sampling options. Whatever the gate
accepts streams text to its end or ends with an error line; whatever it refuses is a 4xx that names the field."""

from __future__ import annotations

import asyncio
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

from gpt_lightning.generate import SamplingOptions  # noqa: E402
from gpt_lightning.model import GPT, GPTConfig  # noqa: E402
from gpt_lightning.serve import FIELDS, GPTStreamAPI, Limits, RequestError, RequestGate, parse_request  # noqa: E402
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
    from tests.test_hf import train_bpe

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
    import gpt_lightning.serve as serve

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
                 disconnect: bool = False) -> None:  # fmt: skip
        self.chunks, self.delay, self.disconnect = chunks, delay, disconnect
        length = [(b"content-length", str(sum(map(len, chunks))).encode())] if content_length else []
        self.scope = {"type": "http", "path": "/predict", "method": "POST",
                      "headers": [(b"content-type", b"application/json"), *length]}  # fmt: skip
        self.reads, self.status, self.body = 0, 0, b""

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
            self.status = message["status"]
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
    from gpt_lightning.instruct import TEMPLATES

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
