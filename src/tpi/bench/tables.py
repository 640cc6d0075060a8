"""The Markdown tables of docs/benchmarks.md, from the grouped rows (results.group) and the
baseline runs: every configuration beside its bounds, where the time goes, the baselines, and
the paper's table."""
from __future__ import annotations

import statistics

from tpi.bench import findings

MiB = 2**20


def mib(b) -> str:
    return "–" if not b else f"{b / MiB:.0f}"



def link_text(c: dict) -> str:
    return c.get("link") or "none"



def sched_text(c: dict) -> str:
    ctx = f", context {c['max_seq']}" if c.get("max_seq") else ""
    if c.get("no_scheduler"):
        return "off" + ctx
    return f"window {c['window']}, " + (f"budget {c['memory_budget']}" if c.get("memory_budget") else
                                        "default budget" if c.get("mem_limit") else "no budget") + ctx



def limit_text(c: dict) -> str:
    if not c.get("mem_limit"):
        return "none"
    return c["mem_limit"] + (f" (master {c['master_mem_limit']})" if c.get("master_mem_limit") else "")



def testbed_table(rows: list[dict]) -> str:
    head = ("| runner | devices | all-reduce | link | dtype | scheduler | limit per device | TTFT (s) | ms/token | "
            "bound (ms) | latency / compute / memory / disk bound (ms) | planner (ms) | measured / bound | "
            "peak memory master / worker (MiB) | load |\n"
            "|---|---:|---|---|---|---:|---|---:|---:|---:|---|---:|---:|---|---:|\n")
    lines = []
    for r in rows:
        c, b = r["config"], r["bounds"]
        pl = b.get("planner") or {}
        planner = f"{pl['total_ms']:.0f}" if "total_ms" in pl else "–"
        ms = f"{r['ms']:.0f}" + (f" (n={r['n']}: {', '.join(f'{x:.0f}' for x in r['ms_all'])})" if r["n"] > 1 else " (n=1)")
        lines.append(
            f"| {c['runner']} | {c['devices']} | {c['allreduce'] if c['devices'] > 1 else '–'} | {link_text(c)} | "
            f"{c['dtype']} | {sched_text(c)} | {limit_text(c)} | "
            f"{r['ttft_s']:.2f} | {ms} | {b['bound_ms']:.0f} ({b['bound_by']}) | "
            f"{b['latency_ms']:.0f} / {b['compute_ms']:.1f} / {b['memory_ms']:.1f} / {b['disk_ms']:.1f} | {planner} | "
            f"{r['ms'] / b['bound_ms']:.1f}x | {mib(r['master_peak'])} / {mib(r['worker_peak'])} | "
            f"{statistics.median(r['load']):.1f} |")
    return head + "\n".join(lines) + "\n"



def breakdown_table(rows: list[dict]) -> str:
    head = ("| runner | devices | all-reduce | link | scheduler | limit | master compute / comm / disk wait (ms) | "
            "workers compute / comm / disk wait, mean (ms) | measured ms/token |\n|---|---:|---|---|---|---|---|---|---:|\n")
    lines = []
    for r in rows:
        c = r["config"]
        if r["compute"][0] is None:
            continue

        def trio(i):
            vals = [[x for x in r[k][i] if x is not None] for k in ("compute", "comm", "disk")]
            return " / ".join(f"{statistics.mean(v) * 1e3:.0f}" if v else "–" for v in vals)

        devs = c["devices"]
        w = trio(slice(1, devs)) if devs > 1 else "–"
        lines.append(f"| {c['runner']} | {devs} | {c['allreduce'] if devs > 1 else '–'} | {link_text(c)} | "
                     f"{sched_text(c)} | {limit_text(c)} | {trio(slice(0, 1))} | {w} | {r['ms']:.0f} |")
    return head + "\n".join(lines) + "\n" if lines else ""



def baseline_table(runs: list[dict]) -> str:
    head = ("| system | dtype | max_memory | limit | TTFT (s) | ms/token | peak RSS (MiB) | cgroup peak (MiB) | "
            "prompt tokens | torch threads | load |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in sorted(runs, key=lambda r: (r["config"]["system"], r["config"]["dtype"], r["machine"]["time_utc"])):
        c, x = r["config"], r["result"]
        mm = c.get("max_memory_bytes")
        lines.append(f"| {c['system']} | {c['dtype']} | {mib(mm) + ' MiB' if mm else 'none'} | "
                     f"{mib(c.get('mem_limit_bytes')) + ' MiB' if c.get('mem_limit_bytes') else 'none'} | "
                     f"{x['ttft_s']:.2f} | {x['token_latency_s'] * 1e3:.0f} | {mib(x['peak_rss_bytes'])} | "
                     f"{mib(x.get('cgroup_max_usage_bytes'))} | {x['prompt_tokens']} | {x.get('torch_threads', '–')} | "
                     f"{r['machine']['loadavg'][0]:.1f} |")
    return head + "\n".join(lines) + "\n"



def paper_table(rows: list[dict], baselines: list[dict]) -> str:
    """The paper's shape: TTFT, token latency and peak memory per system, scheduler off and on,
    at 0 ms star links with the device count that has the most variants, beside the baselines."""
    base = findings.table_rows(rows)
    if not base:
        return ""
    n = base[0]["config"]["devices"]
    base = sorted(base, key=lambda r: (not r["config"].get("no_scheduler"), r["config"].get("memory_budget") or "~"))
    acc = [b["result"]["token_latency_s"] * 1e3 for b in baselines  # at tpi's storage dtype
           if b["config"].get("offload") and b["config"]["dtype"] == "bfloat16"]
    acc_ms = statistics.median(acc) if acc else None

    def ratio(ms: float) -> str:
        return f"{acc_ms / ms:.1f}x" if acc_ms else "–"

    head = ("| system | devices | limit per device | TTFT (s) | ms/token | peak memory per device (MiB) | "
            "Accelerate bfloat16 / this (ms/token) | load |\n|---|---:|---|---:|---:|---|---:|---:|\n")
    lines = []
    for r in base:
        c = r["config"]
        if r["rss_master"] and r["rss_master"] != r["master_peak"]:  # a container: VmHWM and the cgroup's peak
            peaks = f"master {mib(r['rss_master'])} RSS / {mib(r['master_peak'])} cgroup" + (
                f"; largest worker {mib(r['rss_worker'])} / {mib(r['worker_peak'])}" if r["worker_peak"] else "")
        else:
            peaks = f"master {mib(r['master_peak'])}" + (f"; largest worker {mib(r['worker_peak'])}"
                                                         if r["worker_peak"] else "")
        dt = "" if c["dtype"] == "bfloat16" else f", {c['dtype']}"
        lines.append(f"| tpi, scheduler {sched_text(c)}{dt} ({c['runner']}) | {n} | {limit_text(c)} | {r['ttft_s']:.1f} | "
                     f"{r['ms']:.0f} (n={r['n']}) | {peaks} | {ratio(r['ms'])} | {statistics.median(r['load']):.1f} |")
    by = {}
    for b in baselines:
        by.setdefault((b["config"]["system"], b["config"]["dtype"], b["config"].get("mem_limit_bytes")), []).append(b)
    for (system, dtype, limit), bs in sorted(by.items(), key=lambda kv: kv[0][:2]):
        ms = statistics.median(b["result"]["token_latency_s"] for b in bs) * 1e3
        rss = max(b["result"]["peak_rss_bytes"] for b in bs)
        cg = max((b["result"].get("cgroup_max_usage_bytes") or 0) for b in bs) if limit else 0
        peak = f"{mib(rss)} RSS / {mib(cg)} cgroup" if cg else mib(rss)
        lines.append(f"| {system}, {dtype} | 1 | {mib(limit) + ' MiB' if limit else 'none'} | "
                     f"{statistics.median(b['result']['ttft_s'] for b in bs):.1f} | {ms:.0f} (n={len(bs)}) | "
                     f"{peak} | {ratio(ms)} | {statistics.median(b['machine']['loadavg'][0] for b in bs):.1f} |")
    return head + "\n".join(lines) + "\n"
