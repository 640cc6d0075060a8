"""The report's matplotlib figures, one function a plot, each fed the grouped rows of one model
(results.group) and returning False when the results hold too little to draw it."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

MiB = 2**20


def _figure():
    """(figure, axes) of one plot, drawn off-screen (matplotlib is imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save(fig, ax, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()


def link_series(rows: list[dict]) -> dict:
    """(runner, devices, all-reduce, limit) -> rows over link latency (no bandwidth cap, fixed budget)."""
    series = defaultdict(list)
    for r in rows:
        c = r["config"]
        if c["devices"] > 1 and not c.get("bandwidth") and not c.get("no_scheduler") and c["dtype"] == "bfloat16":
            series[(c["runner"], c["devices"], c["allreduce"], c.get("mem_limit") or "",
                    c.get("memory_budget") or "")].append(r)
    return {k: sorted(v, key=lambda r: r["config"]["latency_ms"]) for k, v in series.items()
            if len({r["config"]["latency_ms"] for r in v}) > 1}


def plot_latency(rows: list[dict], title: str, path: Path) -> bool:
    series = link_series(rows)
    if not series:
        return False
    fig, ax = _figure()
    for (runner, n, mode, limit, budget), rs in sorted(series.items()):
        xs = [r["config"]["latency_ms"] for r in rs]
        label = f"{mode}, {n} devices ({runner}{', limit ' + limit if limit else ''})"
        line, = ax.plot(xs, [r["ms"] for r in rs], "o-", label=f"{label}: measured (median)")
        lo = [min(r["ms_all"]) for r in rs]
        hi = [max(r["ms_all"]) for r in rs]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.plot(xs, [r["bounds"]["bound_ms"] for r in rs], "--", color=line.get_color(),
                label=f"{mode}: bound ({rs[0]['bounds']['hops']} hops)")
    ax.set_xlabel("emulated one-way link latency (ms)")
    ax.set_ylabel("ms per token (band: min-max of the repeats)")
    ax.set_title(f"Token latency vs link latency, star vs ring ({title})", fontsize=9)
    _save(fig, ax, path)
    return True


def memory_series(rows: list[dict]) -> dict:
    """(runner, limit) -> {devices: row} at 0 ms, star, bfloat16, scheduler on, no explicit budget."""
    pts = defaultdict(dict)
    for r in rows:
        c = r["config"]
        if (c["latency_ms"] == 0 and not c.get("bandwidth") and c["allreduce"] == "star" and not c.get("memory_budget")
                and not c.get("no_scheduler") and c["dtype"] == "bfloat16" and c["window"] == 2):
            pts[(c["runner"], c.get("mem_limit") or "")][c["devices"]] = r
    return {k: v for k, v in pts.items() if len(v) > 1}


def plot_memory(rows: list[dict], baselines: list[dict], title: str, path: Path) -> bool:
    pts = memory_series(rows)
    if not pts:
        return False
    fig, ax = _figure()
    for (runner, limit), by_n in sorted(pts.items()):
        ns = sorted(by_n)
        tag = f"{runner}{', limit ' + limit if limit else ', no limit'}"
        ax.plot(ns, [by_n[n]["master_peak"] / MiB for n in ns], "o-", label=f"master (device 0), {tag}")
        wn = [n for n in ns if by_n[n]["worker_peak"]]
        if wn:
            ax.plot(wn, [by_n[n]["worker_peak"] / MiB for n in wn], "s-", label=f"largest worker, {tag}")
    for b in baselines:
        x = b["result"]
        ax.axhline(x["peak_rss_bytes"] / MiB, ls=":", color="gray")
        ax.text(1, x["peak_rss_bytes"] / MiB, f" {b['config']['system']} {b['config']['dtype']}", fontsize=6,
                va="bottom")
    ax.set_xticks(sorted({n for by_n in pts.values() for n in by_n}))
    ax.set_xlabel("devices")
    ax.set_ylabel("peak memory per device (MiB)")
    ax.set_title(f"Peak memory per device vs device count ({title}; VmHWM, cgroup peak in containers)", fontsize=8)
    _save(fig, ax, path)
    return True


def derived_budget(mem_limit: str) -> int:
    from tpi.bench.bounds import IDLE_RSS_BYTES, docker_size
    from tpi.weights.budget import default_device_budget

    return default_device_budget(1, limit=docker_size(mem_limit), rss=IDLE_RSS_BYTES)


def budget_points(rows: list[dict]) -> dict:
    """(runner, devices, window, context) -> [(budget bytes or None for 'all resident', row)] at 0 ms, star."""
    from tpi.bench.bounds import parse_size

    pts, resident = defaultdict(list), {}
    for r in rows:
        c = r["config"]
        if c["latency_ms"] or c.get("bandwidth") or c["allreduce"] != "star" or c["dtype"] != "bfloat16":
            continue
        b = None if c.get("no_scheduler") else parse_size(c.get("memory_budget"))
        if b is None and not c.get("no_scheduler") and c.get("mem_limit"):
            b = derived_budget(c["mem_limit"])  # the runtime's default rule, as the bounds take it
        if b is None:  # everything resident: the scheduler without a budget, else the scheduler off
            k = (c["runner"], c["devices"])
            if k not in resident or resident[k]["config"].get("no_scheduler"):
                resident[k] = r
        else:
            pts[(c["runner"], c["devices"], c["window"], c.get("max_seq"))].append((b, r))
    out = {k: v + ([(None, resident[k[:2]])] if k[:2] in resident else []) for k, v in pts.items()}
    return {k: v for k, v in out.items() if len(v) > 1}


def plot_budget(rows: list[dict], baselines: list[dict], title: str, path: Path) -> bool:
    pts = budget_points(rows)
    if not pts:
        return False
    fig, ax = _figure()
    finite = [b for v in pts.values() for b, _ in v if b] + [
        b["config"]["max_memory_bytes"] for b in baselines if b["config"].get("max_memory_bytes")]
    right = max(finite) * 1.6 / MiB
    for (runner, n, w, ctx), v in sorted(pts.items(), key=lambda kv: str(kv[0])):
        v = sorted(v, key=lambda p: p[0] or float("inf"))
        xs = [(b / MiB if b else right) for b, _ in v]
        line, = ax.plot(xs, [r["ms"] for _, r in v], "o-", label=f"tpi, {n} devices, window {w}"
                        f"{', context ' + str(ctx) if ctx else ''} ({runner})")
        for x, (_, r) in zip(xs, v):
            if r["config"].get("mem_limit") and not r["config"].get("memory_budget") and not r["config"].get(
                    "no_scheduler"):
                ax.annotate(f"default budget in {r['config']['mem_limit']}", (x, r["ms"]), fontsize=6)
        ax.plot(xs, [r["bounds"]["bound_ms"] for _, r in v], "--", color=line.get_color(), label="its bound")
    for b in baselines:
        c, x = b["config"], b["result"]
        if c.get("offload") and c.get("max_memory_bytes"):
            ax.plot([c["max_memory_bytes"] / MiB], [x["token_latency_s"] * 1e3], "kx",
                    label=f"accelerate disk offload, max_memory {c['max_memory_bytes'] / MiB:.0f} MiB")
    ax.set_xscale("log")
    ax.axvline(right, color="gray", ls=":")
    ax.text(right, ax.get_ylim()[1], " all resident", fontsize=7, va="top")
    ax.set_xlabel("memory budget per worker (MiB, log; a default budget at the runtime's rule for its limit; "
                  "right: everything resident)", fontsize=8)
    ax.set_ylabel("ms per token")
    ax.set_title(f"Token latency vs memory budget ({title})", fontsize=9)
    _save(fig, ax, path)
    return True
