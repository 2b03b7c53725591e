"""Throughput and latency of `mmgen serve` under concurrent clients, batched vs one request at a time.

    python benchmarks/serve.py                                   # 16 clients, 128 requests per mode
    python benchmarks/serve.py --clients 32 --requests 256 --model runs/chat-tiny

For each mode the server runs as its own process (`python -m mmgen.serve`, `--max-batch 1` for one
at a time, the default for batched) on a free loopback port. `--clients` threads each keep one HTTP
connection and send chat requests until `--requests` have been sent in all or `--max-seconds` pass:
a mix of text ("hello! what can you do?", a caption of an attached digit) and image requests ("draw
a handwritten digit d", `mmgen.image = "always"`, `--steps` denoising steps), all with the same
sampling options, so the server may batch any of them together. Prints per mode requests/s, p50/p99
latency, errors (must be 0) and the server's batch counters, then the batched/one-at-a-time speedup.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from mmgen.data.digits import DigitsDataset
from mmgen.pipeline import to_pil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, max_batch: int | None, model: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmgen.serve", "--port", str(port), "--log-level", "warning"]
    cmd += ["--max-batch", str(max_batch)] if max_batch else []
    cmd += ["--model", model] if model else []
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status, _ = call(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "GET", "/health")
            if status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


def call(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def workload(steps: int) -> list[dict]:
    """The request bodies clients cycle through: 2 text, 1 caption, 3 image requests."""
    out = io.BytesIO()
    to_pil(DigitsDataset("test").images[0]).save(out, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    options = {"mmgen": {"steps": steps}, "max_tokens": 48}
    caption = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "which digit is this?"}]
    texts = ["hello! what can you do?", "what can you draw?"]
    bodies = [{"messages": [{"role": "user", "content": t}], **options} for t in texts]
    bodies.append({"messages": [{"role": "user", "content": caption}], **options})
    for d in (3, 5, 7):
        bodies.append({"messages": [{"role": "user", "content": f"draw a handwritten digit {d}"}],
                       "mmgen": {"steps": steps, "image": "always"}, "max_tokens": 48})
    return bodies


def run_clients(port: int, clients: int, requests: int, max_seconds: float, bodies: list[dict]) -> dict:
    """Send `requests` requests from `clients` threads; latencies (s), errors and wall time."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                status, answer = call(conn, "POST", "/v1/chat/completions", {**bodies[i % len(bodies)], "seed": i})
                ok = status == 200 and answer["choices"][0]["message"]["content"]
            except (OSError, ValueError, KeyError) as e:
                status, ok, answer = -1, False, repr(e)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - start)
                if not ok:
                    errors.append(f"{status}: {str(answer)[:200]}")
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - start, "latencies": latencies, "errors": errors}


def measure(args: argparse.Namespace, max_batch: int | None, bodies: list[dict]) -> dict:
    port = free_port()
    proc = start_server(port, max_batch, args.model)
    try:
        result = run_clients(port, args.clients, args.requests, args.max_seconds, bodies)
        result["server"] = call(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "GET", "/health")[1]
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: uvicorn drains, the worker stops
        proc.wait(60)
    return result


def report(name: str, r: dict) -> float:
    lat = np.array(r["latencies"]) * 1000
    rps = len(lat) / r["wall"]
    s = r["server"]
    print(f"{name:<16} {len(lat):>5} requests in {r['wall']:6.2f} s  {rps:7.2f} req/s  p50 {np.percentile(lat, 50):7.1f} "
          f"ms  p99 {np.percentile(lat, 99):7.1f} ms  errors {len(r['errors'])}  (server: {s['batches']} batches, "
          f"{s['joined']} rows joined running batches, largest batch {s['max_rows']} rows)")
    for e in r["errors"][:5]:
        print("   error:", e)
    return rps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the bundled chat-tiny)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=128, help="requests per mode")
    p.add_argument("--max-seconds", type=float, default=45.0, help="stop sending after this long, per mode")
    p.add_argument("--steps", type=int, default=8, help="denoising steps of the image requests")
    args = p.parse_args()
    bodies = workload(args.steps)
    print(f"{args.clients} clients, {args.requests} requests per mode (text, caption and image requests mixed), "
          f"{args.steps} image steps, {os.cpu_count()} CPU cores")
    one = report("one at a time", measure(args, 1, bodies))
    batched = report("batched", measure(args, None, bodies))
    print(f"batching serves {batched / one:.2f}x the requests per second")


if __name__ == "__main__":
    main()
