"""The memory benchmark's matrix (`bench/memory.py run`): every system (TPI's scheduler off,
windows, retention, default budget, quantized stores; transformers and Accelerate disk
offload) with its options and per-device limits, run round after round, the results and
the machine written to one JSON file."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from memory_model import PROMPT
from memory_run import run_hf, run_tpi

GiB, MiB = 1 << 30, 1 << 20


def slice_info(store_dir: Path, world: int) -> dict:
    import torch

    from tpi.settings import RuntimeOptions
    from tpi.engine import kv_cache_bytes
    from tpi.weights.retention import block_costs
    from tpi.weights.store import ShardStore

    store = ShardStore(store_dir)
    # what each block holds once loaded (bfloat16 compute: a bfloat16 block as read), the budget's unit
    sizes = [block_costs(store, r, torch.bfloat16) for r in range(world)]
    return {"slice": max(sum(s) for s in sizes), "largest": max(max(s) for s in sizes),
            "head": 0, "sizes": sizes, "store": store,
            "kv": lambda opts: max(kv_cache_bytes(store, r, RuntimeOptions(**opts)) for r in range(world))}


def systems(args, info: dict) -> list[tuple[str, dict]]:
    """(name, spec) for every system of the matrix."""
    L, head, slc, big = args.limit, info["head"], info["slice"], info["largest"]
    base = dict(dtype="bfloat16", compute_dtype="bfloat16", max_seq=args.max_seq)  # zero-copy: compute in the storage dtype
    kv = info["kv"](base)
    tpi_limits = [L + head] + [L] * (args.world - 1)        # device 0 also holds the head
    out = [
        ("tpi scheduler off", dict(opts=dict(base, scheduler=False), limits=[None] * args.world, store="bfloat16")),
        ("tpi budget holds slice", dict(opts=dict(base, memory_budget=kv + slc), limits=[None] * args.world,
                                        store="bfloat16")),
        ("tpi window 2", dict(opts=dict(base, window=2, memory_budget=kv + 2 * big), limits=tpi_limits, store="bfloat16")),
        ("tpi window 4", dict(opts=dict(base, window=4, memory_budget=kv + 4 * big), limits=tpi_limits, store="bfloat16")),
    ]
    for frac in (0.25, 0.5, 0.75):
        out.append((f"tpi retention {int(frac * 100)}%", dict(
            opts=dict(base, window=2, memory_budget=kv + 2 * big + int(frac * slc)), limits=tpi_limits, store="bfloat16")))
    out += [
        ("tpi default budget", dict(opts=dict(base), limits=tpi_limits, store="bfloat16")),
        ("tpi int8", dict(opts=dict(base, dtype="int8", compute_dtype="bfloat16"), limits=tpi_limits, store="int8")),
        ("tpi int4", dict(opts=dict(base, dtype="int4", compute_dtype="bfloat16"), limits=tpi_limits, store="int4")),
        ("accelerate disk offload", dict(hf=True, offload=True, limit=L)),
        ("transformers whole model", dict(hf=True, offload=False, limit=None)),
    ]
    only = set(args.only.split(",")) if args.only else None
    return [(n, s) for n, s in out if only is None or any(o in n for o in only)]


def cmd_run(args) -> None:
    from tpi.weights.budget import parse_size

    args.limit = parse_size(args.limit)
    stores = Path(args.stores)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = slice_info(stores / "bfloat16", args.world)
    matrix = systems(args, info)
    results = []
    for rnd in range(args.rounds):
        for name, spec in matrix:
            t = time.time()
            if spec.get("hf"):
                r = run_hf(name, Path(args.model), spec["limit"], spec["offload"], args.limit, args.tokens, workdir)
            else:
                r = run_tpi(name.replace(" ", "_").replace("%", ""), stores / spec["store"], args.world, spec["opts"],
                            spec["limits"], args.tokens, workdir)
                r["system"] = name
            r.update(round=rnd, wall_s=time.time() - t, loadavg=os.getloadavg())
            results.append(r)
            peaks = [d.get("peak_rss") for d in r["devices"]]
            print(f"[round {rnd}] {name}: ttft {r.get('ttft_s')} s, {r.get('token_latency_s')} s/token, "
                  f"peak rss {[p and round(p / MiB) for p in peaks]} MiB, exit {r['exit_codes']}", flush=True)
            Path(args.json).write_text(json.dumps(meta(args, info) | {"runs": results}, indent=1))


def meta(args, info) -> dict:
    import torch

    return {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"platform": platform.platform(), "cpu": _cpu(), "cores": os.cpu_count(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": "random Llama-2-7B shape, 8 layers, bfloat16", "world": args.world, "tokens": args.tokens,
        "prompt_tokens": len(PROMPT), "limit": args.limit, "max_seq": args.max_seq,
        "slice_bytes": info["slice"], "largest_block": info["largest"], "head_bytes": info["head"],
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
