"""Decode speed with the output head's candidates gathered to the master (this tree) against
an all-reduce of them (another tree's src/, e.g. the commit before the gather), side by side:
`tpi master --devices N` + N-1 `tpi worker` each, default flags, the streamed chat API,
alternating rounds. Prints per-run figures, medians, the ratio and the load average.

    python bench/head_gather.py --old-src /work/wt-old/src --rounds 5 --tokens 48
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from decode_speed import HttpCluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", required=True, help="src/ of the tree whose head all-reduces")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--devices", type=int, default=4)
    args = ap.parse_args()

    load_before = os.getloadavg()
    old_env = dict(os.environ, PYTHONPATH=os.path.abspath(args.old_src))
    clusters = {"all-reduce (old)": HttpCluster(args.devices, old_env),
                "gather (this tree)": HttpCluster(args.devices)}
    results: dict[str, list[float]] = {k: [] for k in clusters}
    try:
        for c in clusters.values():
            c.token_latency(4)  # warm-up
        for _ in range(args.rounds):
            for name, c in clusters.items():
                results[name].append(c.token_latency(args.tokens))
                print(f"  {name}: {results[name][-1] * 1e3:.1f} ms/token", flush=True)
    finally:
        for c in clusters.values():
            c.close()
    print(f"\nSmolLM2-135M-Instruct, master + {args.devices - 1} workers, {args.tokens} new tokens, greedy, "
          f"{args.rounds} rounds alternating; load average before {load_before[0]:.1f} {load_before[1]:.1f} "
          f"{load_before[2]:.1f}, after {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    old, new = (statistics.median(r) for r in results.values())
    for name, runs in results.items():
        print(f"{name:22s} median {statistics.median(runs) * 1e3:7.1f} ms/token  {[round(x * 1e3, 1) for x in runs]}")
    print(f"gather / all-reduce: {new / old:.3f}")


if __name__ == "__main__":
    main()
