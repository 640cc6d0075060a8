"""Speculative decoding across the cluster, as a user runs it: `tpi generate` with its
default flags on an input-grounded request (rewrite a given paragraph), plain decoding
(`--draft none`) against prompt lookup (`--draft ngram`, the default) and optionally a
draft model, alternating in one run; asserts the greedy tokens are identical and prints
tokens/s, the ratio and the drafts' acceptance.

    python bench/speculative.py --devices 4 --link latency=5ms --rounds 2 --tokens 96
    python bench/speculative.py --draft-model smollm2      # also the draft-model path
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PARAGRAPH = (
    "The town library opened in 1911 with a gift of four hundred books from a retired sea captain. "
    "For decades it occupied two rooms above the post office, where children read by the light of a "
    "single window and the librarian kept a kettle warm on the stove. In 1968 the collection moved "
    "to a new brick building beside the river, and the old rooms became a small museum of the town's "
    "history, with the captain's telescope displayed beside the first catalogue.")
REQUEST = f"Rewrite this paragraph in the past perfect tense, keeping every fact:\n\n{PARAGRAPH}"


def run(draft: str, args) -> dict:
    cmd = [sys.executable, "-m", "tpi_cli", "generate", "--devices", str(args.devices), "--transport", args.transport,
           "--chat", args.request, "--max-new-tokens", str(args.tokens), "--greedy", "--json", "--draft", draft]
    if args.draft_tokens is not None:
        cmd += ["--draft-tokens", str(args.draft_tokens)]
    if args.link and args.transport == "ws":
        cmd += ["--link", args.link]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"tpi generate --draft {draft} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout)
    r["wall_s"] = time.perf_counter() - t0
    n = len(r["tokens"])
    # tokens/s of the reply as the user sees it: first token to last (the prefill is the same
    # forward either way), and per decoded token
    r["decode_tokens_per_s"] = 1.0 / r["token_latency_s"] if r["token_latency_s"] else 0.0
    r["reply_tokens_per_s"] = n / (r["ttft_s"] + r["token_latency_s"] * (n - 1))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--transport", default="ws", choices=["ws", "inproc"])
    ap.add_argument("--link", default="latency=5ms", help="emulated link (ws only)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--request", default=REQUEST, help="the chat message (default: rewrite a given paragraph)")
    ap.add_argument("--draft-tokens", type=int, default=None, help="K (default: the product's)")
    ap.add_argument("--draft-model", default=None, help="also run --draft MODEL (a draft model on the master)")
    args = ap.parse_args()
    drafts = ["none", "ngram"] + ([args.draft_model] if args.draft_model else [])
    runs: dict[str, list[dict]] = {d: [] for d in drafts}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for d in drafts:
            runs[d].append(run(d, args))
    plain = runs["none"][0]["tokens"]
    for d, rs in runs.items():
        for r in rs:
            assert r["tokens"] == plain, f"--draft {d} changed the greedy tokens"
    print(f"{os.cpu_count()} cores, load before {load_before[0]:.1f} after {os.getloadavg()[0]:.1f}; "
          f"SmolLM2 (default dtypes), {args.devices} devices, transport {args.transport}, link {args.link}, "
          f"{len(plain)} tokens, K {args.draft_tokens or 'default'}, {args.rounds} rounds alternating\n"
          f"request: {args.request[:60]!r}...")
    med = {}
    for d, rs in runs.items():
        med[d] = statistics.median(r["decode_tokens_per_s"] for r in rs)
        reply = statistics.median(r["reply_tokens_per_s"] for r in rs)
        drafted, accepted = rs[0].get("drafted", 0), rs[0].get("accepted", 0)
        acc = f", accepted {accepted}/{drafted} drafts ({accepted / drafted:.0%})" if drafted else ""
        print(f"--draft {d:8s} decode {med[d]:6.2f} tokens/s (runs {[round(r['decode_tokens_per_s'], 2) for r in rs]}), "
              f"reply incl. prefill {reply:6.2f} tokens/s, {rs[0]['decode_steps']} decode steps{acc}")
    for d in drafts[1:]:
        print(f"ratio --draft {d} / none: {med[d] / med['none']:.2f}x")
    print("identical greedy tokens: yes")


if __name__ == "__main__":
    main()
