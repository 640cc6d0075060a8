"""Two checkouts of tpi side by side: `tpi generate` on SmolLM2, 4 devices (`--devices`),
float32 store and compute (`--default-flags`: the product's defaults), in process and over
loopback WebSockets, alternating the two checkouts each round; prints ms/token and the
largest device peak RSS (medians), and checks the tokens are equal.
Issue 13's "no speed or memory lost" (docs/benchmarks-inproc.md):

    python bench/before_after.py --before "/work/wt-before/.venv/bin/python -m tpi.cli" \\
        --after "/work/main/.venv/bin/python -m tpi_cli" --after-extra "--draft none" --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess

FLAGS = ["generate", "--prompt", "The history of the Roman Empire", "--greedy", "--json"]
FLOAT32 = ["--dtype", "float32", "--compute-dtype", "float32"]  # issue 13's comparison


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the command that runs the older checkout's CLI")
    ap.add_argument("--after", required=True, help="the same for the newer one")
    ap.add_argument("--before-extra", default="", help="flags only the older one takes")
    ap.add_argument("--after-extra", default="", help="flags only the newer one takes (e.g. --draft none)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--default-flags", action="store_true",
                    help="the product's default store and compute dtypes (bfloat16) instead of float32")
    ap.add_argument("--transports", default="inproc,ws", help="comma-separated: inproc, ws")
    args = ap.parse_args()
    flags = [*FLAGS, "--devices", str(args.devices), *([] if args.default_flags else FLOAT32)]
    transports = args.transports.split(",")
    sides = {"before": shlex.split(args.before), "after": shlex.split(args.after)}
    extra = {"before": shlex.split(args.before_extra), "after": shlex.split(args.after_extra)}
    res: dict = {}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for transport in transports:
            for side in order:
                cmd = [*sides[side], *flags, "--max-new-tokens", str(args.tokens), "--transport", transport,
                       *extra[side]]
                j = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd="/tmp").stdout)
                run = res.setdefault((side, transport), {"ms": [], "peak": [], "tokens": j["tokens"]})
                run["ms"].append(j["token_latency_s"] * 1e3)
                run["peak"].append(max(d["peak_rss_bytes"] for d in j["devices"]) / 2**20)
                assert j["tokens"] == run["tokens"], f"{side} {transport}: tokens differ between rounds"
    print(f"load {os.getloadavg()}; SmolLM2 {'default flags' if args.default_flags else 'float32'}, "
          f"{args.devices} devices, {args.tokens} tokens, {args.rounds} rounds")
    for transport in transports:
        a, b = res[("after", transport)], res[("before", transport)]
        for side, v in (("before", b), ("after", a)):
            print(f"{transport:6s} {side:6s} {statistics.median(v['ms']):6.1f} ms/token {[round(x, 1) for x in v['ms']]}"
                  f"  peak {statistics.median(v['peak']):.0f} MiB")
        print(f"{transport}: after/before {statistics.median(a['ms']) / statistics.median(b['ms']):.2f}x time, "
              f"{statistics.median(a['peak']) / statistics.median(b['peak']):.2f}x peak, "
              f"same tokens: {a['tokens'] == b['tokens']}")


if __name__ == "__main__":
    main()
