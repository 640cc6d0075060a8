"""SmolLM2 on 4 devices: loopback WebSocket processes (star all-reduce) against the
in-process transport, alternating runs of `tpi generate`; prints medians and the ratio.

    python bench/ws_vs_inproc.py --devices 4 --rounds 3 --tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def run(transport: str, devices: int, tokens: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tpi_cli", "generate", "--devices", str(devices), "--transport", transport,
           "--prompt", "The history of the Roman Empire", "--max-new-tokens", str(tokens), "--greedy",
           "--dtype", "float32", "--json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--link", default=None, help="emulated link for the ws runs")
    args = ap.parse_args()
    extra = ["--link", args.link] if args.link else []
    results = {"inproc": [], "ws": []}
    for _ in range(args.rounds):
        for transport in ("inproc", "ws"):
            r = run(transport, args.devices, args.tokens, extra if transport == "ws" else [])
            results[transport].append(r["token_latency_s"])
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; SmolLM2 float32, {args.devices} devices, "
          f"{args.tokens} tokens, link {args.link or 'none'}")
    for k, v in results.items():
        print(f"{k:7s} median {med[k] * 1e3:.1f} ms/token  runs {[round(x * 1e3, 1) for x in v]}")
    print(f"ratio ws/inproc: {med['ws'] / med['inproc']:.2f}x")


if __name__ == "__main__":
    main()
