"""Tokens/s a user of the Compose appliance sees in the web UI, with the default EDGE_LINK
(5 ms one-way latency, 300 Mbit/s, 1 ms jitter, through the netem sidecar): brings up one
checkout's compose.yaml with 4 workers, sends greedy chats through the web UI's /api/chat
(streamed, as the page does), and prints decode tokens/s per request.

Run it once per checkout to compare (e.g. the commit before a change, in its own worktree and
image, and this one), one after the other on a quiet machine:

    IMAGE=tpi:before bash scripts/build-image.sh        # in the other checkout
    python bench/appliance_webui.py --repo /work/wt-before --image tpi:before --label before --json b.json
    python bench/appliance_webui.py --label after --json a.json

Tokens are counted by re-tokenizing the reply with the model's tokenizer (a streamed chunk
may carry several tokens once speculative decoding accepts drafts). Decode tokens/s is
(tokens - 1) / (time of the last chunk - time of the first chunk).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))
sys.path.insert(0, str(HERE))

import appliance as driver  # noqa: E402  (the e2e tests' driver of a Compose project)
from speculative import REQUEST  # noqa: E402  (an input-grounded request: rewrite a paragraph)

REQUESTS = {"question": "What is the capital of France? Answer in a few sentences.", "rewrite": REQUEST}


def measure(app, content: str, max_tokens: int, tokenizer) -> dict:
    marks: list[float] = []
    out = app.chat(content, max_tokens, on_content=lambda o: marks.append(time.monotonic()))
    if out["errors"] or not out["done"]:
        raise SystemExit(f"the reply failed: {out['errors'] or 'no [DONE]'}")
    tokens = len(tokenizer.encode(out["text"]))
    span = marks[-1] - marks[0] if len(marks) > 1 else float("nan")
    return {"tokens": tokens, "chunks": out["chunks"], "ttft_s": out["ttft_s"], "total_s": out["total_s"],
            "decode_tokens_per_s": (tokens - 1) / span if span > 0 else None, "text": out["text"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(HERE.parent), help="the checkout whose compose.yaml runs")
    ap.add_argument("--image", default="tpi:latest", help="its tpi image (TPI_IMAGE)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from tpi.tokenizer import ChatTokenizer
    from tpi.weights.sources import resolve_model

    tokenizer = ChatTokenizer(resolve_model("smollm2"))
    driver.REPO = Path(args.repo).resolve()   # the driver runs `docker compose` there
    os.environ["TPI_IMAGE"] = args.image
    app = driver.Appliance()
    app.env["TPI_IMAGE"] = args.image
    load_before = os.getloadavg()
    results: dict = {"label": args.label, "repo": str(driver.REPO), "image": args.image,
                     "edge_link": driver.EDGE_LINK, "workers": driver.WORKERS, "runs": {k: [] for k in REQUESTS}}
    try:
        t0 = time.monotonic()
        app.compose("up", "-d", "--scale", f"worker={driver.WORKERS}", timeout=driver.UP_TIMEOUT_S)
        app.wait_ready(driver.WORKERS)
        results["up_s"] = time.monotonic() - t0
        measure(app, "Hello", 8, tokenizer)  # warm-up
        for _ in range(args.rounds):
            for name, content in REQUESTS.items():
                results["runs"][name].append(measure(app, content, args.max_tokens, tokenizer))
    finally:
        app.dump_logs()
        app.down()
    results["load"] = {"before": load_before, "after": os.getloadavg()}
    print(f"{args.label}: {args.repo} ({args.image}), EDGE_LINK {driver.EDGE_LINK}, {driver.WORKERS} workers, "
          f"load {load_before[0]:.1f} -> {results['load']['after'][0]:.1f}")
    for name, runs in results["runs"].items():
        rates = [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"]]
        results[f"{name}_median_tokens_per_s"] = statistics.median(rates) if rates else None
        print(f"  {name:8s} median {statistics.median(rates):.2f} tokens/s  runs {[round(x, 2) for x in rates]}  "
              f"({runs[0]['tokens']} tokens; TTFT {statistics.median(r['ttft_s'] for r in runs):.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
