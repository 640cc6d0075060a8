"""Throughput of 1, 2, 4 ... concurrent requests against a real master (batched decoding).

Each level sends C streaming chat requests at once (greedy, `ignore_eos`, so every request
produces exactly --tokens tokens) and measures:
  aggregate tokens/s   all tokens generated / wall time from the first send to the last token
  per-request tokens/s each request's decode rate after its first token (mean)
  TTFT                 time to first token (mean), which includes waiting for other prefills
  batch                mean sequences per decode step, from the master's /metrics
  step                 mean wall time of one decode step, from the master's /metrics

Usage:
  python bench/batching.py                         # starts its own `tpi master` (2 devices, float32)
  python bench/batching.py --master http://HOST:8000 [--api-key KEY]
  python bench/batching.py --memory-budget 200MB   # weights streamed from disk under a budget
With --memory-budget the master (the same engine and `serve`) is started from this script,
in a child process, because `tpi master` has no budget flag yet: each device keeps what
fits and re-reads the rest of its layer blocks from disk on every decode step, which is
where batching pays (one read serves every sequence of the step).
Not a test: it prints a Markdown table to paste into docs/benchmarks*.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests

PROMPTS = ["Tell me a story about a dragon.", "Explain how rain forms.", "Describe a walk in Paris.",
           "Write a letter to a friend.", "List facts about the moon.", "How do bees make honey?",
           "Describe the ocean at night.", "What makes a good teacher?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, exited, kill) -> str:
    """The master's URL once /healthz answers; exits if the process ends (exited() returns its
    exit code, None while it runs) or is not ready within 5 minutes."""
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if exited() is not None:
            raise SystemExit(f"the master exited with {exited()}")
        try:
            if requests.get(url + "/healthz", timeout=2).ok:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    kill()
    raise SystemExit("the master did not become ready")


def start_master(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tpi_cli", "master", "--http", f"127.0.0.1:{port}", "--devices", str(args.devices),
           "--dtype", args.dtype, "--slots", str(max(args.concurrency))]
    print("starting:", " ".join(cmd[2:]), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_ready(port, exited=lambda: proc.poll(), kill=proc.kill)


def _serve_budgeted(port: int, devices: int, dtype: str, slots: int, budget: str, max_seq: int) -> None:
    import logging

    from tpi.settings import RuntimeOptions
    from tpi.engine import build_inproc_engine
    from tpi.settings import ModelSettings
    from tpi.weights.budget import parse_size
    from tpi_master.http_api import serve

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    opts = RuntimeOptions(dtype=dtype, max_seq=max_seq, num_slots=slots, memory_budget=parse_size(budget))
    serve(build_inproc_engine(ModelSettings(None, [1.0] * devices), opts), "127.0.0.1", port)


def start_budgeted_master(args):
    port = free_port()
    print(f"starting: an in-process master, {args.devices} devices, {args.dtype}, memory budget "
          f"{args.memory_budget} per device, context {args.max_seq}", file=sys.stderr)
    proc = multiprocessing.get_context("spawn").Process(
        target=_serve_budgeted, daemon=True,
        args=(port, args.devices, args.dtype, max(args.concurrency), args.memory_budget, args.max_seq))
    proc.start()
    return proc, wait_ready(port, exited=lambda: None if proc.is_alive() else proc.exitcode, kill=proc.kill)


def metrics(url: str, headers: dict) -> dict[str, float]:
    out = {}
    for line in requests.get(url + "/metrics", headers=headers, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def one_request(url: str, headers: dict, prompt: str, tokens: int, record: dict) -> None:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage = None
    with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            if first is None and obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else tokens
    record.update(start=t0, first=first or end, end=end, tokens=n)


def level(url: str, headers: dict, concurrency: int, tokens: int) -> dict:
    before = metrics(url, headers)
    records = [dict() for _ in range(concurrency)]
    threads = [threading.Thread(target=one_request, args=(url, headers, PROMPTS[i % len(PROMPTS)], tokens, records[i]))
               for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = metrics(url, headers)
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    total = sum(r["tokens"] for r in records)
    steps = after["tpi_decode_steps_total"] - before["tpi_decode_steps_total"]
    rows = after["tpi_decode_rows_total"] - before["tpi_decode_rows_total"]
    step_s = after["tpi_decode_step_seconds_sum"] - before["tpi_decode_step_seconds_sum"]
    return {
        "concurrency": concurrency,
        "aggregate_tps": total / wall,
        "per_request_tps": statistics.mean((r["tokens"] - 1) / (r["end"] - r["first"]) for r in records),
        "ttft_s": statistics.mean(r["first"] - r["start"] for r in records),
        "batch": rows / steps if steps else 0.0,
        "step_ms": 1000 * step_s / steps if steps else 0.0,
        "wall_s": wall,
        "tokens": total,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--master", help="URL of a running master (default: start one)")
    ap.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"))
    ap.add_argument("--devices", type=int, default=2, help="devices of the master started here")
    ap.add_argument("--dtype", default="float32", help="storage dtype of the master started here")
    ap.add_argument("--memory-budget", default=None, metavar="SIZE",
                    help="per device, for layer weights + KV cache (e.g. 200MB): stream weights from disk")
    ap.add_argument("--max-seq", type=int, default=512, help="context of the budgeted master (KV cache size)")
    ap.add_argument("--concurrency", default="1,2,4", help="comma-separated levels")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level; the median run is reported")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    proc = None
    url = args.master
    if not url:
        proc, url = start_budgeted_master(args) if args.memory_budget else start_master(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        level(url, headers, 1, 8)  # warm-up
        results = []
        for c in args.concurrency:
            runs = sorted((level(url, headers, c, args.tokens) for _ in range(args.repeats)),
                          key=lambda r: r["aggregate_tps"])
            results.append(runs[len(runs) // 2])
            print(f"concurrency {c}: {results[-1]['aggregate_tps']:.1f} tokens/s", file=sys.stderr)
        cluster = requests.get(url + "/api/cluster", headers=headers, timeout=10).json()
    finally:
        if isinstance(proc, subprocess.Popen):
            proc.terminate()
            proc.wait(timeout=30)
        elif proc is not None:
            proc.terminate()
            proc.join(timeout=30)
    if args.json:
        print(json.dumps({"results": results, "world_size": cluster["world_size"],
                          "transport": cluster["transport"]}, indent=2))
        return 0
    base = results[0]["aggregate_tps"]
    mem = cluster["devices"][0]["memory"]
    streamed = mem.get("streamed_blocks")
    weights = (f"{streamed} of {streamed + mem.get('resident_blocks', 0)} blocks per device streamed from disk"
               if streamed else "all weights resident")
    print(f"{cluster['model']['name']}, {cluster['world_size']} devices ({cluster['transport']}), "
          f"storage {cluster['model']['storage_dtype']}, {weights}, {args.tokens} tokens per request, "
          f"median of {args.repeats}; machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print()
    print("| concurrent requests | aggregate tokens/s | speed-up | per-request tokens/s | mean TTFT (s) "
          "| mean batch | decode step (ms) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['concurrency']} | {r['aggregate_tps']:.1f} | {r['aggregate_tps'] / base:.2f}x "
              f"| {r['per_request_tps']:.1f} | {r['ttft_s']:.2f} | {r['batch']:.2f} | {r['step_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
