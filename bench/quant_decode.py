"""SmolLM2 decode ms/token for bfloat16, int8 and int4 shard stores, side by side.

    python bench/quant_decode.py [--devices 1 --tokens 16 --rounds 3 --compute float32,bfloat16]

In-process engine, every block resident (`scheduler=False`: this measures the linear
kernels, not the disk), greedy, the same prompt; rounds alternate the stores. Reports the
median over rounds of each run's median step time (the first token excluded) and whether
each store's tokens equal the bfloat16 store's. Not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics

from tpi.settings import RuntimeOptions
from tpi.engine import build_inproc_engine
from tpi.settings import ModelSettings
from tpi.model.sampling import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stores", default="bfloat16,int8,int4")
    ap.add_argument("--compute", default="float32,bfloat16")
    args = ap.parse_args()
    configs = [(s, c) for c in args.compute.split(",") for s in args.stores.split(",")]
    engines = {}
    for store, compute in configs:
        engines[(store, compute)] = build_inproc_engine(ModelSettings(None, [1.0] * args.devices), RuntimeOptions(dtype=store, compute_dtype=compute, scheduler=False, max_seq=256))
    ids = next(iter(engines.values())).tokenizer.encode(PROMPT)
    ms = {k: [] for k in configs}
    tokens = {}
    params = SamplingParams(max_new_tokens=args.tokens)
    for e in engines.values():
        e.generator.stop_ids = set()
        e.generator.generate(ids, SamplingParams(max_new_tokens=2))            # warm-up
    for _ in range(args.rounds):
        for key, e in engines.items():
            r = e.generator.generate(ids, params)
            ms[key].append(statistics.median(r.step_times_s) * 1e3)
            tokens[key] = r.tokens
    for e in engines.values():
        e.close()
    print(f"# SmolLM2-135M, {args.devices} device(s) in process, {len(ids)}-token prompt, {args.tokens} new tokens, "
          f"all blocks resident; median of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} at the end")
    print("| store | compute | ms / token | tokens equal to the bfloat16 store's |")
    print("|---|---|---|---|")
    for store, compute in configs:
        same = tokens[(store, compute)] == tokens.get(("bfloat16", compute))
        print(f"| {store} | {compute} | {statistics.median(ms[(store, compute)]):.1f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
