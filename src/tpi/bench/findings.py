"""The report's discussion, computed from the results: for one model, where the measured
ms/token is far from its physical bound and where the devices' time went. Every figure in the
text comes from the grouped rows (results.group) and baselines passed in; the words that
depend on a figure ("above", "closest") are chosen by comparing figures, so the text cannot go
stale when the results change. src/tpi/bench/preface.md holds the hand-written part (general
causes, no figures)."""
from __future__ import annotations

import statistics
from collections import defaultdict

from tpi.bench.plots import link_series


def label(c: dict) -> str:
    s = f"{c['runner']}, {c['devices']} device(s)"
    if c["devices"] > 1:
        s += f", {c['allreduce']}, link {c.get('link') or 'none'}"
    if c.get("no_scheduler"):
        s += ", scheduler off"
    elif c.get("memory_budget"):
        s += f", window {c['window']}, budget {c['memory_budget']}"
    elif c.get("mem_limit"):
        s += ", default budget"
    if c.get("mem_limit"):
        s += f", limit {c['mem_limit']}" + (f" (master {c['master_mem_limit']})" if c.get("master_mem_limit") else "")
    if c["dtype"] != "bfloat16":
        s += f", {c['dtype']}"
    if c.get("max_seq"):
        s += f", context {c['max_seq']}"
    return s


def _rng(vals: list[float], fmt: str = "{:.1f}") -> str:
    lo, hi = min(vals), max(vals)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def gaps(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    ratios = sorted(((r["ms"] / r["bounds"]["bound_ms"], r) for r in rows), key=lambda x: x[0])
    by = {}
    for _, r in ratios:
        by.setdefault(r["bounds"]["bound_by"], []).append(r)
    dom = ", ".join(f"{k} in {len(v)}" for k, v in sorted(by.items(), key=lambda kv: -len(kv[1])))
    (lo, _), (hi, rhi) = ratios[0], ratios[-1]
    rlo = next((r for x, r in ratios if x >= 1), ratios[0][1])  # the closest that respects its bound
    out = [f"**Gap to the bound.** Over {len(rows)} configurations the measured ms/token is "
           f"{statistics.median(x for x, _ in ratios):.1f}x its physical bound at the median "
           f"(from {lo:.1f}x to {hi:.1f}x). The dominant bound is {dom} of them. Closest: {label(rlo['config'])} "
           f"({rlo['ms']:.0f} ms against a {rlo['bounds']['bound_by']} bound of {rlo['bounds']['bound_ms']:.0f} ms); "
           f"farthest: {label(rhi['config'])} ({rhi['ms']:.0f} ms against {rhi['bounds']['bound_ms']:.0f} ms, "
           f"{rhi['bounds']['bound_by']}-bound)."]
    below = [r for x, r in ratios if x < 1]
    if below:
        out.append(f"{len(below)} configuration(s) ran faster than their bound ("
                   + "; ".join(f"{label(r['config'])}: {r['ms']:.0f} ms against {r['bounds']['bound_ms']:.0f} ms "
                               f"{r['bounds']['bound_by']}" for r in below)
                   + "): there the bound's inputs, probes of a shared machine taken in short windows, are below what "
                   "the machine delivered, so the bound is not one.")
    for kind, rs in sorted(by.items()):
        rr = [r["ms"] / r["bounds"]["bound_ms"] for r in rs]
        out.append(f"{kind.capitalize()}-bound configurations ({len(rs)}): {_rng(rr)}x their bound "
                   f"(median {statistics.median(rr):.1f}x).")
    return [" ".join(out)]


def step_parts(r: dict) -> dict | None:
    """Mean per-device compute / comm / disk-wait of one row (seconds), or None without timers."""
    n = r["config"]["devices"]
    comp = [x for x in r["compute"][:n] if x is not None]
    if not comp:
        return None
    comm = [x or 0.0 for x in r["comm"][:n]]
    disk = [x or 0.0 for x in r["disk"][:n]]
    return {"compute": comp, "comm": comm, "disk": disk,
            "layers_ms": max(a + b + c for a, b, c in zip(comp, comm, disk)) * 1e3}


def breakdown(rows: list[dict]) -> list[str]:
    """Where the time went, for the rows with per-device timers, summarised over them."""
    out = []
    with_parts = [(r, step_parts(r)) for r in rows]
    with_parts = [(r, p) for r, p in with_parts if p]
    if not with_parts:
        return out
    comm_over = []
    def source(r):
        return "last" if "last" in r["step_source"] else "mean"

    for src in sorted({source(r) for r, _ in with_parts}):
        share = [(p["layers_ms"] / r["ms"], r) for r, p in with_parts if source(r) == src]
        lo = min(share, key=lambda x: x[0])
        what = ("the mean decode step (local: every step; docker: the steps sampled from /api/cluster while the "
                "tokens streamed)" if src == "mean" else
                "the last step only (one sample, as /api/cluster reports it: above 100% means that step was slower "
                "than the mean)")
        out.append(f"**Outside the layers, measured.** The devices' own timers for {what} (compute + all-reduce wait + disk "
                   f"wait of the slowest device) come to {_rng([100 * f for f, _ in share], '{:.0f}')}% of the "
                   f"measured ms/token over {len(share)} configuration(s). The lowest share, {100 * lo[0]:.0f}% of "
                   f"{lo[1]['ms']:.0f} ms in {label(lo[1]['config'])}, leaves the most time to what no device's "
                   f"timer sees (the head, sampling, the master's loop, the HTTP/SSE path in containers).")
    for r, p in with_parts:
        if r["config"]["devices"] > 1:
            wait = statistics.mean(p["comm"]) * 1e3
            comm_over.append(((wait - r["bounds"]["latency_ms"]) / (2 * r["bounds"]["layers"]), r))
    if comm_over:
        vals = [v for v, _ in comm_over]
        hi = max(comm_over, key=lambda x: x[0])
        out.append(f"**All-reduce overhead beyond the link.** Waiting in all-reduces minus the emulated link's "
                   f"delay, per all-reduce: {_rng(vals, '{:.1f}')} ms (median {statistics.median(vals):.1f} ms; "
                   f"largest in {label(hi[1]['config'])}). This includes waiting for the slowest device's compute; "
                   f"the bound counts the link's delay only.")
    disk_rows = [(r, p) for r, p in with_parts if max(p["disk"]) > 0.05 * max(p["layers_ms"] / 1e3, 1e-9)]
    if disk_rows:
        parts = []
        for r, p in disk_rows:
            parts.append(f"{label(r['config'])}: disk wait {_rng([d * 1e3 for d in p['disk']], '{:.0f}')} ms per step "
                         f"per device beside {_rng([c * 1e3 for c in p['compute']], '{:.0f}')} ms of compute, "
                         f"disk bound {r['bounds']['disk_ms']:.0f} ms")
        out.append("**Disk waits** above 5% of a step: " + "; ".join(parts) + ".")
    return out


def link_slopes(rows: list[dict]) -> list[str]:
    out = []
    for (runner, n, mode, limit, budget), rs in sorted(link_series(rows).items()):
        xs = [r["config"]["latency_ms"] for r in rs]
        ys = [r["ms"] for r in rs]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        per_ms = next(r["bounds"]["latency_ms"] / r["config"]["latency_ms"] for r in rs if r["config"]["latency_ms"])
        word = "above" if slope > 1.1 * per_ms else "below" if slope < 0.9 * per_ms else "at"
        if slope < 0:
            word = "negative: the spread between repeats exceeds the link's effect; below"
        out.append(f"{mode}, {n} devices ({runner}): {slope:.0f} ms/token per ms of link latency, {word} the bound's "
                   f"{per_ms:.0f} (2 all-reduces x layers x {rs[0]['bounds']['hops']} hops); fitted "
                   f"{my - slope * mx:.0f} ms/token at 0 ms")
    return ["**Link latency.** Least-squares slopes: " + "; ".join(out) + "."] if out else []


def bandwidth(rows: list[dict]) -> list[str]:
    """Each bandwidth-capped configuration against the same one uncapped."""
    def k(c):
        return (c["runner"], c["devices"], c["allreduce"], c["latency_ms"], c["dtype"], c.get("memory_budget"),
                c.get("no_scheduler"), c.get("mem_limit"))

    free = {k(r["config"]): r for r in rows if not r["config"].get("bandwidth")}
    parts = []
    for r in sorted((r for r in rows if r["config"].get("bandwidth")), key=lambda r: r["config"]["bandwidth"]):
        f = free.get(k(r["config"]))
        if f:
            t = (r["bounds"].get("planner") or {}).get("transfer_ms")
            parts.append(f"{label(r['config'])}: {r['ms']:.0f} ms/token against {f['ms']:.0f} uncapped "
                         f"({r['ms'] / f['ms']:.2f}x)" + (f"; the planner's transfer time {t:.1f} ms" if t is not None
                                                          else ""))
    return ["**Bandwidth.** " + "; ".join(parts) + "."] if parts else []


def planner(rows: list[dict]) -> list[str]:
    pr = [(r["ms"] / r["bounds"]["planner"]["total_ms"], r) for r in rows
          if "total_ms" in (r["bounds"].get("planner") or {})]
    refused = [r for r in rows if "error" in (r["bounds"].get("planner") or {})]
    out = []
    if pr:
        star = [x for x, r in pr if r["config"]["allreduce"] == "star" or r["config"]["devices"] == 1]
        ring = [x for x, r in pr if r["config"]["allreduce"] == "ring" and r["config"]["devices"] > 1]
        s = (f"**The planner's prediction** (`plan_cluster(...).estimate.total_ms`) is below the measurement in "
             f"{sum(x > 1 for x, _ in pr)} of {len(pr)} configurations; measured / predicted ")
        if star:
            s += f"{_rng(star)}x (median {statistics.median(star):.1f}x) with star links"
        if ring:
            s += (f"{'; ' if star else ''}{_rng(ring)}x (median {statistics.median(ring):.1f}x) with ring, which it "
                  f"models as star (2 hops)")
        out.append(s + ".")
    if refused:
        out.append(f"The planner refused {len(refused)} configuration(s) that ran: "
                   + "; ".join(f"{label(r['config'])}: {r['bounds']['planner']['error']}" for r in refused[:3]) + ".")
    return out


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows the paper's table compares: 0 ms star links, no bandwidth cap, at the device count
    with the most scheduler and dtype variants measured (ties: the larger)."""
    base = [r for r in rows if r["config"]["latency_ms"] == 0 and r["config"]["allreduce"] == "star"
            and not r["config"].get("bandwidth")]
    by = defaultdict(set)
    for r in base:
        c = r["config"]
        by[c["devices"]].add((c.get("no_scheduler"), c.get("memory_budget"), c["window"], c["dtype"]))
    n = max(by, key=lambda k: (len(by[k]), k), default=None)
    return [r for r in base if r["config"]["devices"] == n]


def systems(rows: list[dict], baselines: list[dict]) -> list[str]:
    """TPI against itself (scheduler off / window / default budget) and against the baselines."""
    base = table_rows(rows)
    if not base:
        return []
    off = [r for r in base if r["config"].get("no_scheduler")]
    out = []
    hf = {}
    for b in baselines:
        if b["config"].get("offload") and b["config"]["dtype"] != "bfloat16":
            continue  # tpi stores bfloat16: compare with Accelerate at the same dtype
        key = "offload" if b["config"].get("offload") else f"whole-{b['config']['dtype']}"
        hf.setdefault(key, []).append(b["result"]["token_latency_s"] * 1e3)
    hf = {k: statistics.median(v) for k, v in hf.items()}
    for r in base:
        if r["config"].get("no_scheduler"):
            continue
        s = f"{label(r['config'])}: {r['ms']:.0f} ms/token"
        if off:
            s += f", {r['ms'] / off[0]['ms']:.2f}x scheduler off"
        if "offload" in hf:
            x = hf["offload"] / r["ms"]
            s += (f", {x:.1f}x faster than Accelerate disk offload" if x >= 1 else
                  f", {1 / x:.1f}x slower than Accelerate disk offload")
        if "whole-bfloat16" in hf:
            s += f", {r['ms'] / hf['whole-bfloat16']:.1f}x transformers' whole-model bfloat16"
        out.append(s)
    if off and "whole-bfloat16" in hf:
        out.append(f"{label(off[0]['config'])}: {off[0]['ms']:.0f} ms/token, "
                   f"{off[0]['ms'] / hf['whole-bfloat16']:.1f}x transformers' whole-model bfloat16")
    return ["**Systems** (medians; the baselines alternated with these runs): " + "; ".join(out) + "."] if out else []


def ttft(rows: list[dict], baselines: list[dict]) -> list[str]:
    """TTFT against the token latency: how much the prompt's forward pass costs beyond one step."""
    base = table_rows(rows)
    if not base:
        return []
    parts = [f"{label(r['config'])}: {r['ttft_s']:.1f} s, {r['ttft_s'] * 1e3 / r['ms']:.1f}x its token latency"
             for r in base]
    by = defaultdict(list)
    for b in baselines:
        by[(b["config"]["system"], b["config"]["dtype"])].append(b["result"])
    for (system, dtype), xs in sorted(by.items()):
        t = statistics.median(x["ttft_s"] for x in xs)
        ms = statistics.median(x["token_latency_s"] for x in xs) * 1e3
        parts.append(f"{system} {dtype}: {t:.1f} s, {t * 1e3 / ms:.1f}x")
    prompt = next((r["runs"][0]["result"].get("prompt_tokens") for r in base), None)
    return [f"**Time to first token** ({prompt} prompt tokens, one forward pass over all of them, then the head) "
            "against the time of one decode step: " + "; ".join(parts) + "."]


def noise(rows: list[dict]) -> list[str]:
    multi = [r for r in rows if r["n"] > 1]
    single = len(rows) - len(multi)
    loads = [x for r in rows for x in r["load"]]
    s = (f"**Noise.** 1-minute load average {_rng(loads)} on 2 cores during these runs. ")
    if multi:
        spread = sorted(((max(r["ms_all"]) / min(r["ms_all"])), r) for r in multi)
        s += (f"Repeats of one configuration differ by {_rng([x for x, _ in spread], '{:.2f}')}x (max/min; median "
              f"{statistics.median(x for x, _ in spread):.2f}x, widest: {label(spread[-1][1]['config'])}). ")
    if single:
        s += f"{single} configuration(s) ran once: their figure is one run, not a median."
    return [s.strip()]


def memory(rows: list[dict]) -> list[str]:
    from tpi.bench.bounds import docker_size

    lim = [r for r in rows if r["config"].get("mem_limit")]
    if not lim:
        return []
    parts, tight = [], []
    for r in lim:
        c = r["config"]
        wl = docker_size(c["mem_limit"])
        ml = docker_size(c.get("master_mem_limit") or c["mem_limit"])
        m_rss, w_rss = (r["rss_master"] or 0) / ml, (r["rss_worker"] or 0) / wl
        parts.append(f"{label(c)}: master {m_rss:.0%} RSS / {r['master_peak'] / ml:.0%} cgroup, largest worker "
                     f"{w_rss:.0%} / {(r['worker_peak'] or 0) / wl:.0%}")
        if max(m_rss, w_rss) > 0.95:
            tight.append(f"{label(c)} ({'master' if m_rss >= w_rss else 'a worker'} at {max(m_rss, w_rss):.0%})")
    s = ("**Memory against the container limits** (VmHWM / cgroup peak as a share of each container's limit; the "
         "cgroup peak includes page cache, which a streaming device fills up to its limit without being short of "
         "memory, so the RSS share is the one that says how close a device came to being OOM-killed): "
         + "; ".join(parts) + ".")
    if tight:
        s += (" Above 95% of the limit in RSS: " + ", ".join(tight) + ". The default budget is derived from what "
              "the process holds when its runner is built; whatever it loads afterwards (on the master, the head) "
              "comes on top of it.")
    return [s]


def discussion(rows: list[dict], baselines: list[dict]) -> str:
    items = (gaps(rows) + breakdown(rows) + link_slopes(rows) + bandwidth(rows) + planner(rows) + systems(rows, baselines)
             + ttft(rows, baselines) + memory(rows) + noise(rows))
    return "".join(f"- {x}\n" for x in items)
