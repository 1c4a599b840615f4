"""`python main.py serve`: the streaming API gives generate's text, refuses bad input with a 4xx that names
the field and keeps serving, stops generating when its client goes, bounds its queue, and its page works
in a real browser (Chromium, driven by Playwright)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import assert_clean_error, assert_ok, cli, cli_env, main_py

pytestmark = pytest.mark.slow
pytest.importorskip("litserve", reason="the serve extra installs LitServe: pip install -e '.[serve]'")

MAX_QUEUE = 4
# A stream the tests hold open or cancel: long enough that it cannot end by itself while a test waits on it,
# however slowly a loaded CI machine schedules the test (2,000 tokens of the tiny model take about a second).
ENDLESS = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        connection = self.connection()
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()

    def post(self, body: bytes | dict, content_type: str = "application/json") -> http.client.HTTPResponse:
        connection = self.connection()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", "/predict", body=data, headers={"Content-Type": content_type})
        return connection.getresponse()

    def stream(self, request: dict) -> list[dict]:
        response = self.post(request)
        assert response.status == 200, response.read()
        return [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]


def start_server(folder: Path, ckpt: Path, *args: str) -> tuple[subprocess.Popen, Server]:
    """`python main.py serve` in a session of its own (its process group holds every process of the server),
    answering /health."""
    port, log = free_port(), folder / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            main_py("serve", f"--ckpt_path={ckpt}", f"--port={port}", *args),
            cwd=folder, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    served = Server(port, log)
    deadline = time.monotonic() + 120
    while True:
        try:
            if served.get("/health")[0] == 200:
                return process, served
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # a server that is late is not left loading on the cores
            pytest.fail(f"the server did not answer /health:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve")
    process, served = start_server(folder, pretrained / "checkpoints" / "last.ckpt", f"--max_queue={MAX_QUEUE}",
                                   f"--max_new_tokens_limit={ENDLESS}")  # fmt: skip
    yield served
    os.killpg(process.pid, signal.SIGTERM)  # the server and LitServe's worker processes
    process.wait(timeout=30)


def test_startup_prints_the_url_and_binds_localhost(server: Server):
    assert f"on http://127.0.0.1:{server.port}/" in server.log.read_text()


def test_the_stream_gives_the_text_that_generate_prints(server: Server, pretrained: Path):
    options = {"max_new_tokens": 80, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 7}
    messages = server.stream({"prompt": "KING ARTHUR:", **options})
    pieces = [m["text"] for m in messages if not m.get("done")]
    assert len(pieces) > 1 and messages[-1] == {"text": "", "done": True, "characters": len("".join(pieces)),
                                                "finish_reason": "length", "prompt_tokens": len("KING ARTHUR:"),
                                                "completion_tokens": 80}  # fmt: skip
    printed = cli("generate", f"--ckpt_path={pretrained / 'checkpoints' / 'last.ckpt'}", "--prompt=KING ARTHUR:",
                  *(f"--{k}={v}" for k, v in options.items()), in_process=True)  # fmt: skip
    assert_ok(printed)
    assert printed.stdout == "KING ARTHUR:" + "".join(pieces) + "\n"


@pytest.mark.parametrize(
    "body, status, field, message",
    [
        (b'{"prompt": "KING', 400, None, "the body is not JSON"),
        (b'["KING ARTHUR:"]', 400, None, "must be a JSON object"),
        ({"prompt": "KING", "colour": "red"}, 422, "colour", "unknown field"),
        ({"prompt": ""}, 422, "prompt", "non-empty string"),
        ({"prompt": "K" * 4001}, 422, "prompt", "more than the limit of 4,000"),
        ({"prompt": "KING 東京 Ω"}, 422, "prompt", r"3 character\(s\) outside the model's .*'Ω', '京', '東'"),
        ({"prompt": "KING", "max_new_tokens": ENDLESS + 1}, 422, "max_new_tokens", f"from 1 to {ENDLESS:,}"),
        ({"prompt": "KING", "max_new_tokens": "ten"}, 422, "max_new_tokens", "must be an integer"),
        ({"prompt": "KING", "temperature": -0.1}, 422, "temperature", ">= 0"),
        ({"prompt": "KING", "top_p": 0}, 422, "top_p", r"\(0, 1\]"),
        ({"prompt": "KING", "top_p": 1.5}, 422, "top_p", r"\(0, 1\]"),
        ({"prompt": "KING", "top_k": 0}, 422, "top_k", ">= 1"),
        ({"prompt": "KING", "seed": True}, 422, "seed", "must be an integer"),
        (b"[" * 50_000, 400, None, "the body is not JSON"),  # (100,000 is over the body limit: a 413)
        (b'{"prompt": "KING", "top_k": ' + b"[" * 50_000 + b"}", 400, None, "the body is not JSON"),
        (b'{"prompt": "KING", "temperature": 1' + b"0" * 400 + b"}", 422, "temperature", ">= 0 and finite"),
        ({"prompt": "KING", "temperature": float("nan")}, 422, "temperature", ">= 0 and finite"),
        ({"prompt": "KING \ud800"}, 422, "prompt", "lone surrogate"),
        (b'{"prompt": "' + b"K" * 60_000 + b'"}', 413, None, "more than .* --max_prompt_chars"),
    ],
    ids=["malformed JSON", "not an object", "unknown field", "empty prompt", "prompt too long",
         "outside the vocabulary", "max_new_tokens over the cap", "max_new_tokens not a number",
         "negative temperature", "top_p 0", "top_p 1.5", "top_k 0", "seed not an integer", "nested deeply",
         "a value nested deeply", "a temperature no float holds", "temperature NaN", "a lone surrogate",
         "a body over the limit"],
)  # fmt: skip
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(server: Server, body, status, field,
                                                                           message):  # fmt: skip
    import re

    response = server.post(body)
    error = json.loads(response.read())
    assert response.status == status and error["field"] == field and re.search(message, error["error"]), error
    assert server.stream({"prompt": "KING", "max_new_tokens": 3})[-1]["done"]  # still serving


def test_a_tiny_temperature_streams_the_greedy_text(server: Server):
    # It once passed the gate and failed in the worker: a "200 OK" with nothing in it.
    tiny = server.stream({"prompt": "KING", "max_new_tokens": 30, "temperature": 1e-40})
    greedy = server.stream({"prompt": "KING", "max_new_tokens": 30, "temperature": 0})

    # Messages group whatever text a time interval produced, so only the text and the summary can be compared.
    def text(stream: list[dict]) -> str:
        return "".join(message.get("text", "") for message in stream)

    assert tiny[-1]["done"] and tiny[-1]["characters"] == 30
    assert text(tiny) == text(greedy) and tiny[-1] == greedy[-1]


def test_fuzzed_requests_get_a_4xx_naming_the_field_or_a_whole_stream(server: Server):
    from tests.unit.test_serve_unit import fuzzed_body

    rng = random.Random("a real server")
    for _ in range(40):
        body = fuzzed_body(rng)
        response = server.post(body)
        answer = response.read()
        if response.status != 200:
            error = json.loads(answer)
            assert response.status in (400, 413, 422) and error["error"] and "field" in error, (body[:200], answer)
            continue
        messages = [json.loads(line) for line in answer.decode().splitlines()]
        assert messages and messages[-1].get("done") is True, (body[:200], answer[-300:])


def test_the_openapi_schema_and_the_docs_page_answer(server: Server):
    status, body = server.get("/openapi.json")
    assert status == 200, body[-500:]
    paths = json.loads(body)["paths"]
    assert "/predict" in paths and "/model" in paths and "/" not in paths
    status, body = server.get("/docs")
    assert status == 200 and b"/openapi.json" in body


def test_a_form_content_type_is_read_as_the_json_it_is(server: Server):
    response = server.post(
        json.dumps({"prompt": "KING", "max_new_tokens": 3}).encode(), content_type="application/x-www-form-urlencoded"
    )  # what curl -d sends
    assert response.status == 200 and b'"done": true' in response.read()


def test_the_model_describes_itself(server: Server):
    status, body = server.get("/model")
    described = json.loads(body)
    assert status == 200 and described["vocab_size"] > 20 and described["context"] == 32
    assert described["parameters"] == 27_360 and described["tokenizer"] == "characters"
    assert isinstance(described["val_loss"], float) and described["steps"] == 40
    assert described["trained_on"]["source"].endswith("play.txt")


def test_the_page_is_one_self_contained_file(server: Server):
    status, body = server.get("/")
    page = body.decode()
    assert status == 200 and "<script>" in page and "<style>" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page  # nothing fetched from elsewhere


def test_a_client_that_goes_away_stops_its_generation(server: Server):
    connection = server.connection()
    connection.request("POST", "/predict", body=json.dumps({"prompt": "KING", "max_new_tokens": ENDLESS}),
                       headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        response = connection.getresponse()
        for _ in range(5):
            response.fp.readline()  # the stream has started
    finally:
        connection.close()  # as a closed tab or the page's Stop button does (and, should a read fail, the stream
        # is not left generating for the next tests of this server)
    deadline = time.monotonic() + 30
    while "stopped after" not in server.log.read_text():
        assert time.monotonic() < deadline, "generation went on after its client left"
        time.sleep(0.1)
    line = next(line for line in server.log.read_text().splitlines() if "stopped after" in line)
    produced = int(line.split("stopped after ")[1].split()[0])
    assert produced < 1000  # it stopped within a few tokens of the disconnect
    assert server.stream({"prompt": "KING", "max_new_tokens": 3})[-1]["done"]


def test_beyond_the_queue_limit_a_request_gets_a_fast_503(server: Server):
    held = [server.connection() for _ in range(MAX_QUEUE)]
    try:
        for connection in held:
            connection.request("POST", "/predict", body=json.dumps({"prompt": "KING", "max_new_tokens": ENDLESS}),
                               headers={"Content-Type": "application/json"})  # fmt: skip
        # Every stream's status comes before the worker takes its request, so all of them are in the gate's
        # count now: one generating, the others waiting behind it, in whatever order the server read them.
        # (Waiting for the first one's text would hang whenever the server read another one first.)
        assert [connection.getresponse().status for connection in held] == [200] * MAX_QUEUE
        start = time.monotonic()
        response = server.post({"prompt": "KING", "max_new_tokens": 3})
        assert response.status == 503 and "busy" in json.loads(response.read())["error"]
        assert time.monotonic() - start < 2.0
    finally:
        for connection in held:  # the held streams are cancelled, also when an assertion failed: the next tests
            connection.close()  # share this server
    drain(server)


def test_clients_whose_bodies_come_late_cannot_pass_the_queue_limit(server: Server):
    drain(server)
    body = json.dumps({"prompt": "KING", "max_new_tokens": 3}).encode()
    clients = []
    for _ in range(MAX_QUEUE + 4):  # each sends its headers now and its body later, as a slow network would
        client = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))  # fmt: skip
        clients.append(client)
    time.sleep(0.5)
    statuses = []
    for client in clients:
        try:
            client.sendall(body)
        except OSError:
            pass  # a refused client's connection may already be closed
        with client, client.makefile("rb") as answer:
            statuses.append(int(answer.readline().split()[1]))
    assert sorted(statuses) == [200] * MAX_QUEUE + [503] * 4


def drain(server: Server) -> None:
    """Waits until the server takes a request again: streams that earlier tests cancelled have ended."""
    deadline = time.monotonic() + 30
    while True:
        response = server.post({"prompt": "KING", "max_new_tokens": 1})
        if response.status == 200 and b'"done": true' in response.read():
            return
        assert time.monotonic() < deadline
        time.sleep(0.2)


def processes_in_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "signum, to_group",
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGINT, True)],
    ids=["SIGTERM (kill, systemd, docker stop)", "SIGHUP", "SIGINT to the process group (Ctrl-C in a terminal)"],
)
def test_a_signal_stops_every_process_of_the_server_frees_its_port_and_says_so_in_one_line(
    pretrained: Path, tmp_path: Path, signum: signal.Signals, to_group: bool
):
    process, served = start_server(
        tmp_path, pretrained / "checkpoints" / "last.ckpt", f"--max_new_tokens_limit={ENDLESS}"
    )
    try:
        connection = served.connection()  # a stream in progress, as a server being stopped usually has
        connection.request("POST", "/predict", body=json.dumps({"prompt": "KING", "max_new_tokens": ENDLESS}),
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        assert json.loads(response.readline())["text"]  # generating
        (os.killpg if to_group else os.kill)(process.pid, signum)
        start = time.monotonic()
        assert process.wait(timeout=30) == 0
        while processes_in_group(process.pid):  # LitServe's worker, HTTP and manager processes, and their helpers
            assert time.monotonic() - start < 10, "processes of the server outlived it"
            time.sleep(0.1)
        assert time.monotonic() - start < 10
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a restarted server binds
            s.bind(("127.0.0.1", served.port))
        output = served.log.read_text()
        after_start = output.split(f"on http://127.0.0.1:{served.port}/", 1)[1].splitlines()[1:]
        assert after_start == [f"stopped by {signum.name}: every process of the server has ended, and port "
                               f"{served.port} is free."], output[-3000:]  # fmt: skip
        last = json.loads(response.read().decode().splitlines()[-1])  # the stream in progress was told why it ended
        assert "the server is stopping" in last["error"]
    finally:
        if processes_in_group(process.pid):  # a failed test leaves no server behind
            os.killpg(process.pid, signal.SIGKILL)


def test_serving_a_missing_checkpoint_is_a_clear_error(tmp_path: Path):
    assert_clean_error(cli("serve", "--ckpt_path=missing.ckpt", in_process=True), "missing.ckpt does not exist")


# -- a real browser ------------------------------------------------------------------------------------


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium; CI installs it)")
def test_the_page_in_chromium_streams_stops_and_shows_errors(server: Server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs Playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        sync_api.expect(page.locator("#model")).to_contain_text("parameters")
        assert page.locator("#chat").is_hidden()  # not a chat model: the plain mode alone
        page.fill("#prompt", "KING ARTHUR:")
        page.fill("#max_new_tokens", str(ENDLESS))
        page.click("#generate")
        lengths = []
        while len(set(lengths)) < 3:  # the text arrives in more than one update
            lengths.append(len(page.inner_text("#generated")))
            page.wait_for_timeout(20)
            assert len(lengths) < 500, "the text did not grow"
        page.click("#stop")
        # A renderer busy with an endless stream on 2 loaded cores can take seconds to run the abort's handler.
        sync_api.expect(page.locator("#status")).to_contain_text("stopped after", timeout=30_000)
        stopped_at = len(page.inner_text("#generated"))
        page.wait_for_timeout(500)
        assert len(page.inner_text("#generated")) == stopped_at < ENDLESS  # it stopped growing
        page.fill("#prompt", "KING 東京")
        page.click("#generate")
        sync_api.expect(page.locator("#error")).to_contain_text("outside the model's")
        assert page.locator("#error").is_visible()
        browser.close()
