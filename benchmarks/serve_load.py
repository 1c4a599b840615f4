"""`python main.py serve` under load: N concurrent streaming clients over loopback, for N = 1, 4, 16, 64.

    python -m benchmarks.serve_load --ckpt-path runs/pretrain_cpu/version_0/checkpoints/last.ckpt

It starts the server (in a fresh process, as a user would), waits for it, then for each N starts N clients
at once, each sending one request of `--tokens` new tokens (its own seed) and reading the stream to its
end. For each N it prints the median and 95th percentile time to the first character, the characters per
second of one client and of all together, the errors (0 is required below the queue limit), and the
server's peak resident memory (its processes' high-water marks, summed). Last, the same requests run one
after another through `generate` in this process, with no server: the ratio of the server's total
characters per second to that is the cost (or gain) of serving. Every request has a deadline
(`--timeout`), and the benchmark stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import torch

from benchmarks.common import ROOT, peak_resident_bytes_of_tree
from gpt_lightning.sampling import SamplingOptions, stream_text
from gpt_lightning.sources import load_model

PROMPT = "ROMEO:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, port: int, max_queue: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(ROOT / "main.py"), "serve", f"--ckpt_path={ckpt}", f"--port={port}",
               f"--max_queue={max_queue}"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGTERM)
    raise TimeoutError("the server did not become healthy in 180 s")


def stream(port: int, request: dict, timeout: float) -> dict:
    """One client: (time to first character, characters, seconds, error)."""
    start = time.perf_counter()
    first, characters, error = None, 0, None
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("POST", "/predict", body=json.dumps(request), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            error = f"HTTP {response.status}"
        else:
            for line in response:
                message = json.loads(line)
                if message["text"] and first is None:
                    first = time.perf_counter() - start
                characters += len(message["text"])
                if time.perf_counter() - start > timeout:
                    error = "deadline"
                    break
        connection.close()
    except OSError as err:
        error = type(err).__name__
    return {"first": first, "characters": characters, "seconds": time.perf_counter() - start, "error": error}


def round_of(port: int, clients: int, tokens: int, timeout: float) -> tuple[list[dict], float]:
    results: list[dict] = [{}] * clients

    def client(i: int) -> None:
        results[i] = stream(port, {"prompt": PROMPT, "max_new_tokens": tokens, "seed": i}, timeout)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-path", required=True, help="the checkpoint (or GPT-2 folder) to serve")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per request")
    parser.add_argument("--max-queue", type=int, default=128, help="the server's queue limit (above every N)")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of one request, in seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and the baseline")
    args = parser.parse_args()

    port = free_port()
    server = start_server(args.ckpt_path, port, args.max_queue, args.threads)
    rows, totals = [], {}
    try:
        stream(port, {"prompt": PROMPT, "max_new_tokens": 5}, args.timeout)  # warm up
        for clients in args.clients:
            results, wall = round_of(port, clients, args.tokens, args.timeout)
            ok = [r for r in results if r["error"] is None and r["first"] is not None]
            firsts = [r["first"] for r in ok] or [float("nan")]
            per_client = statistics.median(r["characters"] / r["seconds"] for r in ok) if ok else float("nan")
            totals[clients] = sum(r["characters"] for r in results) / wall
            errors = len(results) - len(ok)
            server_mb = peak_resident_bytes_of_tree(server.pid) / 1e6
            rows.append(
                f"| {clients} | {statistics.median(firsts):.3f} | {percentile(firsts, 0.95):.3f} | "
                f"{per_client:,.0f} | {totals[clients]:,.0f} | {errors} | {server_mb:,.0f} MB |"
            )
            print(f"N={clients}: done in {wall:.1f} s", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    torch.set_num_threads(args.threads)
    gpt, tokenizer = load_model(args.ckpt_path)
    start, characters = time.perf_counter(), 0
    requests = max(args.clients)
    for seed in range(requests):  # what the server's worker runs for each request, without the server
        texts = stream_text(gpt, tokenizer, PROMPT, SamplingOptions(max_new_tokens=args.tokens, seed=seed))
        characters += sum(len(text) for text in texts)
    alone = characters / (time.perf_counter() - start)

    print(f"\n{args.tokens} new tokens per request, prompt {PROMPT!r}, {args.threads} torch threads; server "
          f"queue limit {args.max_queue}:\n")  # fmt: skip
    print("| clients | first character p50 (s) | p95 (s) | chars/s per client | chars/s total | errors | "
          "server peak RSS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ngenerate alone, in one process, the {requests} requests one after another: {alone:,.0f} chars/s")
    for clients, total in totals.items():
        print(f"served total / generate alone, N={clients}: {total / alone:.2f}")


if __name__ == "__main__":
    main()
