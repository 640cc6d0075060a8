"""The Hugging Face baseline of the memory benchmark (`bench/memory.py hf`, started by
memory_run.py in its cgroup): transformers with the whole model, or Accelerate disk offload,
greedy on the same prompt; writes its timings and memory figures to a JSON file."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from memory_model import PROMPT


def hf_main(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from transformers import AutoModelForCausalLM

    from tpi.host import peak_rss_bytes, rss_bytes

    idle = rss_bytes()
    kw = dict(dtype=torch.bfloat16)
    if args.offload:
        kw.update(device_map="auto", max_memory={"cpu": args.max_memory}, offload_folder=args.offload_folder)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kw).eval()
    ids = torch.tensor([PROMPT])
    gen = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def timed(n):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
        return time.perf_counter() - t

    with torch.no_grad():
        timed(2)                                   # warm-up
        first = timed(1)
        total = timed(args.tokens)
    Path(args.result).write_text(json.dumps({
        "idle_rss": idle, "peak_rss": peak_rss_bytes(), "ttft_s": first,
        "token_latency_s": (total - first) / (args.tokens - 1),
        "device_map": sorted(set(map(str, getattr(model, "hf_device_map", {}).values()))),
    }))
