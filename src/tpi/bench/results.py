"""The results `tpi bench report` reads: bench/results/*.json sorted into testbed runs,
baselines, failed runs and others; each run's bounds recomputed with today's bounds.py; the
repeats of one configuration grouped into one row of medians (what the tables, plots and
findings take)."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path


def model_of(r: dict) -> str:
    """The short model name of a record: 'smollm2' or the model directory's name."""
    if r.get("model"):
        return r["model"]
    m = (r.get("config") or {}).get("model")
    return "smollm2" if not m or "smollm2" in str(m).lower() else Path(m).name



def load(results: Path) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(testbed runs, baseline runs, failed runs, other results) from results/*.json."""
    testbed, baselines, failed, other = [], [], [], []
    for p in sorted(results.glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(r, dict):
            continue
        r["_file"] = str(p)
        if r.get("kind") not in ("testbed", "baseline"):
            other.append(r)
        elif "error" in r:
            failed.append(r)
        elif r["kind"] == "baseline":
            baselines.append(r)
        else:
            testbed.append(r)
    return testbed, baselines, failed, other



def recompute_bounds(runs: list[dict]) -> None:
    """Bounds from each run's configuration with today's bounds.py (so a fix to the bound
    applies to every stored run alike), taking the best disk rate, GFLOP/s and copy rate any
    sweep of these runs measured: the probes of a shared machine vary from sweep to sweep,
    and a bound takes the machine at its best."""
    from tpi.bench.bounds import bounds
    from tpi.bench.testbed import RunConfig
    from tpi.config import load_model_config
    from tpi.weights.sources import resolve_model

    from tpi.bench.bounds import disk_mbps, gflops

    cfgs = {}
    best_disk = max((disk_mbps(r["machine_capability"]) for r in runs), default=0.0)
    best_gflops = max((gflops(r["machine_capability"]) for r in runs), default=0.0)
    best_mem = max((r["machine_capability"]["mem_bandwidth_gbs"] for r in runs), default=0.0)
    for r in runs:
        c = r["config"]
        try:
            if c.get("model") not in cfgs:
                cfgs[c.get("model")] = load_model_config(resolve_model(c.get("model")))
            rc = RunConfig(**{k: v for k, v in c.items() if k in RunConfig.__dataclass_fields__})
            r["bounds"] = bounds(cfgs[c.get("model")], {**c, "bandwidth_bytes_s": rc.bandwidth_bytes_s},
                                 {**r["machine_capability"], "disk_parallel_mbps": best_disk,
                                  "best_gflops": best_gflops, "mem_bandwidth_gbs": best_mem})
        except Exception:  # noqa: BLE001 - model not on this machine: keep the stored bounds
            pass



def key(r: dict) -> tuple:
    c = r["config"]
    return (model_of(r), c["runner"], c["devices"], c["allreduce"], c["latency_ms"], c.get("bandwidth") or "",
            c["dtype"], c["window"], c.get("memory_budget") or "", c.get("no_scheduler", False),
            c.get("mem_limit") or "", c.get("master_mem_limit") or "", c.get("cpus") or 0, c["tokens"],
            c.get("max_seq") or 0)



def group(runs: list[dict]) -> list[dict]:
    """Repeats of one configuration -> one row with medians (and the count)."""
    by = defaultdict(list)
    for r in runs:
        by[key(r)].append(r)
    rows = []
    for k in sorted(by):
        rs = by[k]
        res = [r["result"] for r in rs]
        timed = [r for r in rs if step_source(r) != "last"] or rs  # mean steps where any run has them
        last = rs[-1]
        devs = last["result"]["devices"]

        def peak(d):
            return d.get("cgroup_max_usage_bytes") or d.get("peak_rss_bytes") or 0

        rows.append({
            "config": last["config"], "n": len(rs), "bounds": last["bounds"], "runs": rs,
            "ttft_s": statistics.median(x["ttft_s"] for x in res),
            "ms": statistics.median(x["token_latency_s"] for x in res) * 1e3,
            "ms_all": [x["token_latency_s"] * 1e3 for x in res],
            "master_peak": peak(devs[0]), "worker_peak": max((peak(d) for d in devs[1:]), default=None),
            "rss_master": devs[0].get("peak_rss_bytes"),
            "rss_worker": max((d.get("peak_rss_bytes") or 0 for d in devs[1:]), default=None),
            "load": [r["machine"]["loadavg"][0] for r in rs], "ttft_all": [x["ttft_s"] for x in res],
            # per device, the median over the repeats of: the mean decode step (local; docker when sampled
            # while streaming), else the last step /api/cluster reported (older docker runs)
            **{k: [step_median(timed, i, f) for i in range(len(devs))]
               for k, f in (("comm", "comm_s"), ("compute", "compute_s"), ("disk", "disk_wait_s"))},
            "step_source": sorted({step_source(r) for r in timed}),
        })
    return rows



def step_source(run: dict) -> str:
    devs = run["result"]["devices"]
    if devs and devs[0].get("per_token"):
        return "mean" if run["config"]["runner"] == "local" else "sampled"
    return "last"



def step_median(runs: list[dict], rank: int, field: str):
    vals = []
    for r in runs:
        devs = r["result"]["devices"]
        d = devs[rank] if rank < len(devs) else {}
        v = (d.get("per_token") or d.get("last_forward") or {}).get(field)
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None
