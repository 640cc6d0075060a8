"""`tpi bench baselines`: Hugging Face transformers, whole model in one process, on the same
model directory, prompt and number of new tokens as the testbed; greedy. Each configuration
runs in a fresh subprocess so its peak RSS (VmHWM) is its own.

TTFT is one generate() of 1 new token; token latency is (generate(T) - generate(1)) / (T-1);
both the median over --rounds after a warm-up.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tpi.bench import machine


def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_one(model_dir: str, dtype: str, prompt: str, tokens: int, rounds: int, offload: bool) -> dict:
    """Runs in the child process."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if offload:
        kwargs.update(device_map="auto", max_memory={"cpu": "64MiB"}, offload_folder=tempfile.mkdtemp(),
                      offload_state_dict=True)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    load_s = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode(prompt)])
    gen = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def timed(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
        return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

    timed(2)  # warm-up
    firsts, per = [], []
    out_tokens: list[int] = []
    for _ in range(rounds):
        first, _ = timed(1)
        total, out_tokens = timed(tokens)
        firsts.append(first)
        per.append((total - first) / (tokens - 1))
    return {"ttft_s": statistics.median(firsts), "token_latency_s": statistics.median(per),
            "ttft_all_s": firsts, "token_latency_all_s": per, "tokens": len(out_tokens),
            "prompt_tokens": ids.shape[1], "text": tok.decode(out_tokens), "token_ids": out_tokens,
            "peak_rss_bytes": _vmhwm(), "load_s": load_s, "torch_threads": torch.get_num_threads()}


def run_baselines(args) -> int:
    from tpi.weights.sources import resolve_model

    model_dir = str(resolve_model(args.model))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = [(d, False) for d in args.dtype.split(",")]
    if args.offload:
        variants += [(d, True) for d in args.dtype.split(",")]
    for dtype, offload in variants:
        name = f"hf-{dtype}" + ("-offload" if offload else "")
        before = machine.snapshot()
        code = ("import json,sys; from tpi.bench.baselines import measure_one; "
                f"print(json.dumps(measure_one({model_dir!r}, {dtype!r}, {args.prompt!r}, {args.tokens}, "
                f"{args.rounds}, {offload})))")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        record = {"kind": "baseline", "config": {"system": "transformers" + (" + accelerate disk offload" if offload
                                                                              else ", whole model"),
                                                 "dtype": dtype, "offload": offload, "tokens": args.tokens,
                                                 "prompt": args.prompt, "model": model_dir, "rounds": args.rounds},
                  "command": machine.command_line(), "machine": before}
        if p.returncode == 0:
            record["result"] = json.loads(p.stdout.strip().splitlines()[-1])
            r = record["result"]
            msg = f"TTFT {r['ttft_s']:.3f} s, {r['token_latency_s'] * 1e3:.1f} ms/token, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
        else:
            record["error"] = p.stderr[-2000:]
            msg = "FAILED: " + p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else "FAILED"
        record["machine_after"] = machine.snapshot()
        path = out_dir / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"[bench baseline] {name}: {msg}  [{time.perf_counter() - t:.0f} s, load {before['loadavg'][0]:.1f}]"
              f" -> {path}", flush=True)
    return 0
