"""`tpi bench baselines`: Hugging Face transformers on the same model directory, prompt and
number of new tokens as the testbed; greedy. Two systems:

  whole    transformers, the whole model in one process (no memory limit: it needs it all);
  offload  transformers + Accelerate disk offload (`device_map="auto"`, `max_memory` at the
           per-device budget, `offload_folder`), in a cgroup with that memory limit, so the
           page cache cannot hold the offloaded weights (BENCHMARKING.md, "The page-cache trap").

Each runs in a fresh subprocess (its peak RSS, VmHWM, is its own; with a limit also the
cgroup's peak, page cache included), after the page cache is dropped (as root).

TTFT is one generate() of 1 new token; token latency is (generate(T) - generate(1)) / (T-1);
both the median over --rounds after a warm-up.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tpi.bench import machine
from tpi.bench.testbed import PROMPT, RESULTS


@dataclass(frozen=True)
class Baselines:
    """What `tpi bench baselines` runs: each dtype x each system."""
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    systems: tuple[str, ...] = ("whole",)     # whole (transformers) and/or offload (+ Accelerate disk offload)
    tokens: int = 16
    prompt: str = PROMPT
    model: str | None = None
    rounds: int = 3                           # median over this many rounds
    max_memory: int = 2**30                   # offload: Accelerate's max_memory (the per-device budget)
    limit: int | None = None                  # offload: the cgroup memory limit (default: max_memory)
    offload_dir: str | None = None            # offload: where the offload folder goes (default: /tmp)
    timeout: float = 1800.0                   # seconds per system
    out: Path = RESULTS


def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_one(model_dir: str, dtype: str, prompt: str, tokens: int, rounds: int, offload: bool,
                max_memory: int | None = None, offload_folder: str | None = None) -> dict:
    """Runs in the child process."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if offload:
        kwargs.update(device_map="auto", max_memory={"cpu": max_memory},
                      offload_folder=offload_folder or tempfile.mkdtemp())
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
            "peak_rss_bytes": _vmhwm(), "load_s": load_s, "torch_threads": torch.get_num_threads(),
            "device_map": sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()})}


def run_baselines(args: Baselines) -> int:
    import shutil
    import tempfile

    from tpi.bench import cgroup
    from tpi.bench.testbed import model_slug
    from tpi.host import drop_page_cache
    from tpi.weights.sources import resolve_model

    model_dir = str(resolve_model(args.model))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_memory, limit = args.max_memory, args.limit or args.max_memory
    failures = 0
    for dtype in args.dtypes:
        for system in args.systems:
            offload = system == "offload"
            name = f"{model_slug(args.model)}-hf-{dtype}" + ("-offload" if offload else "")
            folder = tempfile.mkdtemp(prefix="tpi-offload-", dir=args.offload_dir) if offload else None
            code = ("import json,sys; from tpi.bench.baselines import measure_one; "
                    f"print(json.dumps(measure_one({model_dir!r}, {dtype!r}, {args.prompt!r}, {args.tokens}, "
                    f"{args.rounds}, {offload}, {max_memory}, {folder!r})))")
            dropped = drop_page_cache()
            before = machine.snapshot()
            t = time.perf_counter()
            cg = cgroup.Cgroup("tpi-bench-hf", limit if offload else None) if cgroup.available() else None
            try:
                argv = [sys.executable, "-c", code]
                p = cg.run(argv, args.timeout) if cg else subprocess.run(argv, capture_output=True, text=True,
                                                                          timeout=args.timeout)
                mem = {"cgroup_limit_bytes": cg.limit, "cgroup_max_usage_bytes": cg.peak(),
                       "oom_kills": cg.oom_kills()} if cg else {"cgroup_limit_bytes": None}
            finally:
                if cg:
                    cg.remove()
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
            record = {"kind": "baseline", "model": model_slug(args.model),
                      "config": {"system": "transformers + accelerate disk offload" if offload
                                 else "transformers, whole model",
                                 "dtype": dtype, "offload": offload, "tokens": args.tokens, "prompt": args.prompt,
                                 "model": model_dir, "rounds": args.rounds,
                                 "max_memory_bytes": max_memory if offload else None,
                                 "mem_limit_bytes": limit if offload and cg else None},
                      "command": machine.command_line(), "machine": before, "caches_dropped": dropped}
            if p.returncode == 0:
                record["result"] = {**json.loads(p.stdout.strip().splitlines()[-1]), **mem}
                r = record["result"]
                msg = (f"TTFT {r['ttft_s']:.3f} s, {r['token_latency_s'] * 1e3:.1f} ms/token, "
                       f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
            else:
                failures += 1
                record["error"] = (p.stderr[-2000:] + (f" [OOM kills: {mem.get('oom_kills')}]"
                                                       if mem.get("oom_kills") else ""))
                msg = "FAILED: " + (p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else str(p.returncode))
            record["machine_after"] = machine.snapshot()
            path = out_dir / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
            path.write_text(json.dumps(record, indent=1))
            print(f"[bench baseline] {name}: {msg}  [{time.perf_counter() - t:.0f} s, load "
                  f"{before['loadavg'][0]:.1f}] -> {path}", flush=True)
    return 1 if failures else 0
