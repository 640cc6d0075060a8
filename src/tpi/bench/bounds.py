"""Physical bounds on the time per token of one configuration, and the planner's prediction.

    latency  = 2 all-reduces/layer x layers x hops x one-way link latency
               hops = 2 for star (partial sum in, total out), 2(N-1) for ring
    compute  = FLOPs per token / the machine's float32 GFLOP/s (all emulated devices share its
               cores; the runtime's bfloat16 kernels are not faster here)
    memory   = weight bytes touched per token / memory bandwidth
    disk     = bytes re-read from disk per token (the planner's streamed bytes, summed over the
               devices: they share this machine's one disk) / the best disk rate measured
Compute, memory and disk overlap (the scheduler prefetches while computing), but every
all-reduce waits for the compute before it, so the bound is latency + max(compute, memory, disk).
A measured time far above it is time spent where this model of the system does not look
(Python and framework overhead per layer, thread wake-ups, a busy shared host).
"""
from __future__ import annotations

import time

from tpi.cluster.estimate import DTYPE_BYTES, Link, PlannerSettings, all_reduces_per_token
from tpi.cluster.planner import plan_cluster


IDLE_RSS_BYTES = 220 * 10**6  # a Python process that has imported torch (/work/shared/BENCHMARKING.md)


def hops(allreduce: str, devices: int) -> int:
    if devices <= 1:
        return 0
    return 2 if allreduce == "star" else 2 * (devices - 1)


def probe_memory_bandwidth(mb: int = 256, repeats: int = 3) -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of a few."""
    import torch

    src = torch.empty(mb << 18, dtype=torch.float32)  # (mb MiB / 4 bytes,)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def probe_disk_parallel(readers: int, mb: int = 128, directory: str = "/var/tmp") -> float:
    """MB/s of `readers` threads each reading its own `mb` MB file at once, pages dropped first:
    what devices streaming from one disk together can get (one small sequential reader, as
    tpi.cluster.capability.probe_disk, sees less)."""
    import os
    import tempfile
    import threading

    from tpi.host import drop_file_cache

    block = os.urandom(1 << 20)
    names = []
    try:
        for _ in range(readers):
            fd, name = tempfile.mkstemp(prefix=".tpi-bench-disk-", dir=directory)
            names.append(name)
            with os.fdopen(fd, "wb") as f:
                for _ in range(mb):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
                drop_file_cache(f.fileno())

        def read(name):
            with open(name, "rb", buffering=0) as f:
                drop_file_cache(f.fileno())
                while f.read(1 << 22):
                    pass

        threads = [threading.Thread(target=read, args=(n,)) for n in names]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return readers * mb * (1 << 20) / 1e6 / (time.perf_counter() - t)
    finally:
        for n in names:
            os.unlink(n)


def machine_capability(readers: int = 1) -> dict:
    """One measurement of the whole machine: GFLOP/s (float32 decode-shaped matmul), disk MB/s
    (one small reader, and `readers` large ones at once), memory GB/s. Taken under whatever
    load the shared machine had at the time."""
    from tpi.cluster.capability import measure

    cap = measure("float32")
    return {"capability": cap.to_json(), "mem_bandwidth_gbs": probe_memory_bandwidth() / 1e9,
            "disk_parallel_mbps": probe_disk_parallel(readers), "disk_readers": readers}


def gflops(machine_cap: dict) -> float:
    """The machine's GFLOP/s: the float32 probe's, or a better figure the report found."""
    return max(machine_cap["capability"]["gflops"], machine_cap.get("best_gflops") or 0.0)


def disk_mbps(machine_cap: dict) -> float:
    """The best disk rate measured: a bound assumes the disk at its best."""
    return max(machine_cap["capability"]["disk_mbps"], machine_cap.get("disk_parallel_mbps") or 0.0)


def parse_size(text: str | None) -> int | None:
    if not text:
        return None
    from tpi.weights.budget import parse_size as ps

    return ps(text)


def docker_size(text: str | None) -> int | None:
    """A docker memory limit ('1g', '1536m': binary units) in bytes."""
    if not text:
        return None
    t = text.strip().lower()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def model_facts(cfg) -> dict:
    from tpi.cluster.estimate import attn_flops, attn_params, head_flops, mlp_flops, mlp_params

    L = cfg.num_layers
    layer_params = L * (attn_params(cfg, cfg.num_heads, cfg.num_kv_heads, True)
                        + mlp_params(cfg, cfg.intermediate_size, True))
    flops = L * (attn_flops(cfg, cfg.num_heads, cfg.num_kv_heads, 64) + mlp_flops(cfg, cfg.intermediate_size))
    # per token the output head reads its V x H rows (the LM head, or the tied embedding) and the
    # final norm; the embedding table only the rows of the tokens fed (one in decode)
    head_params = cfg.vocab_size * cfg.hidden_size + 2 * cfg.hidden_size
    return {"layers": L, "layer_params": layer_params, "head_params": head_params,
            "flops_per_token": flops + head_flops(cfg),
            "hidden_size": cfg.hidden_size}


def bounds(cfg, run: dict, machine_cap: dict) -> dict:
    """Bounds (ms/token) and the planner's prediction for one run's configuration."""
    from tpi.cluster.capability import DeviceCapability

    n = run["devices"]
    facts = model_facts(cfg)
    lat_s = (run.get("latency_ms") or 0.0) / 1e3
    h = hops(run.get("allreduce", "star"), n)
    latency_ms = all_reduces_per_token(facts["layers"]) * h * lat_s * 1e3
    cap = DeviceCapability.from_json(machine_cap["capability"])
    cdt = run.get("compute_dtype") or "float32"
    compute_ms = facts["flops_per_token"] / (gflops(machine_cap) * 1e9) * 1e3
    sdt = run.get("dtype") or "bfloat16"
    wdt = sdt if sdt in ("int8", "int4", "gguf") else cdt  # quantized stores are computed from their own bytes
    touched = facts["layer_params"] * DTYPE_BYTES[wdt] + facts["head_params"] * DTYPE_BYTES[cdt]
    memory_ms = touched / (machine_cap["mem_bandwidth_gbs"] * 1e9) * 1e3

    # The planner: N devices, each a share of this machine's cores (they run on it together).
    per_dev_cores = min(run.get("cpus") or cap.cores / n, cap.cores / n)
    # Budgets as the runtime applies them: --memory-budget covers a device's layer weights,
    # its slice of the output head and its KV cache, the master's as any other's (it holds no
    # embedding table); without one, each container's limit (the master's own) through the
    # planner's default rule; without a limit, the machine's.
    budget = parse_size(run.get("memory_budget"))
    budgets = [budget] * n if budget is not None else [cap.mem_budget_bytes] * n
    if budget is None and run.get("mem_limit"):
        # The runtime's rule (limit - the process's RSS - headroom), with the RSS of an idle
        # worker process: the budget it derives in a container of that limit, give or take
        # what the process holds beyond the idle runtime when it builds its runner.
        from tpi.weights.budget import default_device_budget

        def rule(limit: str) -> int:
            return default_device_budget(1, limit=docker_size(limit), rss=IDLE_RSS_BYTES)

        budgets = [rule(run.get("master_mem_limit") or run["mem_limit"])] + [rule(run["mem_limit"])] * (n - 1)
    devs = [DeviceCapability(arch=cap.arch, cores=max(1, int(per_dev_cores)), mem_total_bytes=cap.mem_total_bytes,
                             mem_budget_bytes=b, gflops=cap.gflops * per_dev_cores / cap.cores,
                             disk_mbps=cap.disk_mbps) for b in budgets]
    bw = run.get("bandwidth_bytes_s") or 1e12
    links = [None] + [Link(rtt_s=2 * lat_s, bandwidth_bytes_s=bw)] * (n - 1)
    settings = PlannerSettings(storage_dtype=sdt, compute_dtype=cdt, window_blocks=run.get("window") or 2,
                               **({"max_seq": run["max_seq"]} if run.get("max_seq") else {}))
    planner = None
    disk_ms = 0.0
    try:
        est = plan_cluster(cfg, devs, links, settings).estimate
        planner = {"total_ms": est.total_ms, "compute_ms": est.compute_ms, "disk_ms": est.disk_ms,
                   "latency_ms": est.latency_ms, "transfer_ms": est.transfer_ms, "head_ms": est.head_ms,
                   "bottleneck": est.bottleneck, "notes": list(est.notes),
                   "models": "star links (2 hops) only" if run.get("allreduce") == "ring" else "as run"}
        planner["streamed_bytes"] = [d.streamed_bytes for d in est.devices]
        if not run.get("no_scheduler"):
            # The emulated devices share this machine's one disk: their streams add up.
            disk_ms = sum(d.streamed_bytes for d in est.devices) / (disk_mbps(machine_cap) * 1e6) * 1e3
    except Exception as e:  # noqa: BLE001 - a plan the planner refuses is a finding, not a crash
        planner = {"error": str(e)}
    parts = {"compute": compute_ms, "memory": memory_ms, "disk": disk_ms}
    local = max(parts, key=parts.get)
    return {"latency_ms": latency_ms, **{f"{k}_ms": v for k, v in parts.items()}, "hops": h, "layers": facts["layers"],
            "bound_ms": latency_ms + parts[local],
            "bound_by": "latency" if latency_ms > parts[local] else local, "planner": planner}
