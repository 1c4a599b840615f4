"""OpenAI's API on `python main.py serve`, through the `openai` client against real servers: /v1/completions on a
base model and /v1/chat/completions on a chat model, streaming and not, give /predict's text for the same options;
refusals are OpenAI's errors, raised as the client's exceptions; the queue limit holds; and the page's chat mode
works in Chromium."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_ok, cli, make_play
from tests.e2e.test_serve import ENDLESS, MAX_QUEUE, Server, chromium, drain, start_server

pytestmark = pytest.mark.slow
pytest.importorskip("litserve", reason="the serve extra installs LitServe: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

from gpt_lightning.data.instruct import TEMPLATES, render_prompt  # noqa: E402

CHAT = TEMPLATES["chat"]
KING = [{"role": "user", "content": "KING"}]


def write_chat_checkpoint(path: Path) -> Path:
    """A tiny random model that describes itself as a fine-tune in the chat template, as `fit` writes one: a chat
    model to serve, in a second."""
    from gpt_lightning.model import GPT, GPTConfig
    from gpt_lightning.sources import METADATA_KEY, MODEL_PREFIX, metadata
    from gpt_lightning.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(make_play(50) + CHAT.markers)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    weights = {MODEL_PREFIX + name: value for name, value in GPT(config).state_dict().items()}
    described = metadata(config, tokenizer, template=CHAT)
    torch.save({"state_dict": weights, METADATA_KEY: described, "global_step": 0}, path)
    return path


def serving(folder: Path, ckpt: Path) -> Iterator[Server]:
    process, served = start_server(folder, ckpt, f"--max_queue={MAX_QUEUE}", f"--max_new_tokens_limit={ENDLESS}")
    yield served
    os.killpg(process.pid, signal.SIGTERM)  # the server and LitServe's worker processes
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_checkpoint(tmp_path_factory.mktemp("chat") / "chat.ckpt")


@pytest.fixture(scope="module")
def chat_server(chat_ckpt: Path) -> Iterator[Server]:
    yield from serving(chat_ckpt.parent, chat_ckpt)


@pytest.fixture(scope="module")
def base_server(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving(tmp_path_factory.mktemp("base"), pretrained / "checkpoints" / "last.ckpt")


def client(server: Server) -> openai.OpenAI:
    # No retries: the client retries a 503 twice by default, which the queue test would wait through.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=60)


def predicted(server: Server, prompt: str, **options: object) -> tuple[str, dict]:
    """The text /predict streams, and its last line."""
    messages = server.stream({"prompt": prompt, **options})
    return "".join(m["text"] for m in messages), messages[-1]


def test_the_openai_client_streams_a_chat_from_v1_chat_completions_with_predicts_text(chat_server: Server):
    stream = client(chat_server).chat.completions.create(
        model="tiny-chat", messages=KING, stream=True, stream_options={"include_usage": True}, max_tokens=40,
        temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 20},
    )  # fmt: skip
    chunks = list(stream)
    assert {(c.object, c.model) for c in chunks} == {("chat.completion.chunk", "tiny-chat")}
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text, done = predicted(chat_server, "KING", max_new_tokens=40, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    assert len(pieces) > 1 and "".join(pieces) == text  # the prompt, as one user message in the template
    assert chunks[-2].choices[0].finish_reason == done["finish_reason"] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == done["prompt_tokens"] == len(render_prompt(CHAT, "KING"))


def test_a_conversation_is_answered_in_one_object_as_it_streams(chat_server: Server):
    conversation = [{"role": "system", "content": "Be brief."}, *KING, {"role": "assistant", "content": "Lord."},
                    {"role": "user", "content": "And?"}]  # fmt: skip
    chat = client(chat_server).chat.completions
    answer = chat.create(model="m", messages=conversation, max_tokens=12, temperature=0)
    streamed = chat.create(model="m", messages=conversation, max_tokens=12, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == "m"
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == text and choice.finish_reason == "length"
    prompt_tokens = len(render_prompt(CHAT, conversation))  # a character model: a token a character
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)  # fmt: skip


def test_completions_give_predicts_text_and_stop_where_asked(base_server: Server):
    completions = client(base_server).completions
    options = {"max_tokens": 60, "temperature": 0.9, "top_p": 0.95, "seed": 7, "extra_body": {"top_k": 20}}
    completion = completions.create(model="base", prompt="KING ARTHUR:", **options)
    text, _ = predicted(base_server, "KING ARTHUR:", max_new_tokens=60, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    assert completion.object == "text_completion" and completion.model == "base"
    assert completion.choices[0].text == text and completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len("KING ARTHUR:"), 60)
    chunks = list(completions.create(model="base", prompt=["KING ARTHUR:"], stream=True, **options))
    assert {c.object for c in chunks} == {"text_completion"} and "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    stop = text[20:23]
    cut = completions.create(model="base", prompt="KING ARTHUR:", stop=[stop, "never"], **options)
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_completion_on_a_chat_model_reads_the_prompt_as_generate_raw_does(chat_server: Server, chat_ckpt: Path):
    prompt = render_prompt(CHAT, "KING")  # what /predict and /v1/chat/completions have the model read
    completion = client(chat_server).completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0)
    printed = cli("generate", f"--ckpt_path={chat_ckpt}", f"--prompt={prompt}", "--raw=true", "--max_new_tokens=20",
                  "--temperature=0", in_process=True)  # fmt: skip
    assert_ok(printed)
    assert printed.stdout == prompt + completion.choices[0].text + "\n"
    assert completion.choices[0].text == predicted(chat_server, "KING", max_new_tokens=20, temperature=0)[0]


def test_refusals_are_openais_errors_as_the_clients_exceptions(base_server: Server, chat_server: Server):
    with pytest.raises(openai.NotFoundError) as raised:
        client(base_server).chat.completions.create(model="m", messages=KING)
    error = raised.value.response.json()["error"]
    assert error == {"message": error["message"], "type": "invalid_request_error", "param": "model", "code": None}
    assert "not a chat model" in error["message"] and "/v1/completions" in error["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    chat = client(chat_server)
    refused = [
        ("n", lambda: chat.completions.create(model="m", prompt="KING", n=2)),
        ("temperature", lambda: chat.completions.create(model="m", prompt="KING", temperature=-1)),
        ("max_tokens", lambda: chat.completions.create(model="m", prompt="KING", max_tokens=ENDLESS + 1)),
        ("prompt", lambda: chat.completions.create(model="m", prompt="KING 東京")),
        ("presence_penalty", lambda: chat.chat.completions.create(model="m", messages=KING, presence_penalty=1)),
        ("tools", lambda: chat.chat.completions.create(model="m", messages=KING, tools=[tool])),  # type: ignore[list-item]
    ]  # fmt: skip
    for param, call in refused:
        with pytest.raises(openai.BadRequestError) as raised:
            call()
        assert raised.value.param == param and raised.value.type == "invalid_request_error", raised.value.message
    # The options clients send at the value that turns them off are taken, and the server went on serving.
    answer = chat.chat.completions.create(model="m", messages=KING, max_tokens=2, frequency_penalty=0,
                                          presence_penalty=0, n=1, user="me")  # fmt: skip
    assert answer.usage.completion_tokens == 2


def test_beyond_the_queue_limit_a_request_gets_a_fast_503(chat_server: Server):
    drain(chat_server)
    chat = client(chat_server).chat.completions
    held = []
    try:
        # A stream is returned once its status came, which is before the worker takes its request: all of them
        # are in the gate's count, one generating and the others waiting, in whatever order the server read them.
        # (Waiting for the first one's text would hang whenever the server read another one first.)
        for _ in range(MAX_QUEUE):
            held.append(chat.create(model="m", messages=KING, max_tokens=ENDLESS, stream=True))
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as raised:
            chat.create(model="m", messages=KING, max_tokens=3)
        assert raised.value.status_code == 503 and "busy" in raised.value.message
        assert time.monotonic() - start < 2.0
    finally:
        for stream in held:  # the held streams are cancelled, also when an assertion failed: the next tests share
            stream.close()  # this server
    drain(chat_server)


def test_v1_models_and_model_say_what_is_served(base_server: Server, chat_server: Server):
    [model] = client(chat_server).models.list().data
    assert model.id.endswith("chat.ckpt")
    for server, chat in ((base_server, False), (chat_server, True)):
        status, body = server.get("/model")
        assert status == 200 and json.loads(body)["chat"] is chat


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium; CI installs it)")
def test_the_pages_chat_mode_in_chromium_streams_stops_and_keeps_the_conversation(chat_server: Server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs Playwright")
    drain(chat_server)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{chat_server.port}/")
        sync_api.expect(page.locator("#chat")).to_be_visible()  # a chat model: the conversation view
        assert page.locator("#plain").is_hidden()
        page.fill("#max_new_tokens", str(ENDLESS))
        page.fill("#message", "KING")
        with page.expect_request("**/v1/chat/completions") as first:
            page.click("#send")
        assert first.value.post_data_json["messages"] == KING and first.value.post_data_json["stream"] is True
        answer = page.locator(".turn.assistant").last
        lengths = []
        while len(set(lengths)) < 3:  # the answer arrives in more than one update
            lengths.append(len(answer.text_content()))
            page.wait_for_timeout(20)
            assert len(lengths) < 500, "the answer did not grow"
        page.click("#stop")
        # A renderer busy with an endless stream on 2 loaded cores can take seconds to run the abort's handler.
        sync_api.expect(page.locator("#status")).to_contain_text("stopped after", timeout=30_000)
        kept = answer.text_content()
        page.wait_for_timeout(500)
        assert answer.text_content() == kept  # it stopped growing
        page.fill("#max_new_tokens", "5")
        page.fill("#message", "And?")
        with page.expect_request("**/v1/chat/completions") as second:
            page.click("#send")
        # Behind the stopped stream, which the worker ends within a token of seeing its mark, on 2 loaded cores.
        sync_api.expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
        # The conversation so far went with it: the stopped answer is kept as it was shown.
        assert second.value.post_data_json["messages"] == [*KING, {"role": "assistant", "content": kept},
                                                           {"role": "user", "content": "And?"}]  # fmt: skip
        assert page.locator(".turn.user").count() == 2 and page.locator(".turn.assistant").count() == 2
        page.fill("#message", "KING 東京")
        page.click("#send")
        sync_api.expect(page.locator("#error")).to_contain_text("outside the model's")
        assert page.locator(".turn.user").count() == 2  # a refused message goes back to the box, to be mended
        assert page.input_value("#message") == "KING 東京"
        page.click("#new-chat")
        assert page.locator(".turn").count() == 0
        browser.close()
