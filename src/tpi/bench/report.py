"""`tpi bench report`: docs/benchmarks.md and its plots, regenerated from bench/results/*.json
(written by `tpi bench testbed` and `tpi bench baselines`), plus the figures of the other
benchmark pages folded in as sections (their tables and commands, copied, not re-measured)."""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

MiB = 2**20
OTHER_PAGES = [  # (file, title) folded into the report when present
    ("docs/benchmarks-allreduce.md", "All-reduce latency"),
    ("docs/benchmarks-inproc.md", "In-process engine vs transformers"),
    ("docs/benchmarks-batching.md", "Batched decoding"),
    ("docs/benchmarks-memory.md", "Memory scheduler"),
    ("docs/memory-scheduler.md", "Memory scheduler"),  # a design page: linked, not copied
]
LINK_ONLY = {"docs/memory-scheduler.md"}


def load(results: Path) -> tuple[list[dict], list[dict], list[dict]]:
    testbed, baselines, failed = [], [], []
    for p in sorted(results.glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        r["_file"] = str(p)
        if "error" in r:
            failed.append(r)
        elif r.get("kind") == "baseline":
            baselines.append(r)
        elif r.get("kind") == "testbed":
            testbed.append(r)
    return testbed, baselines, failed


def key(r: dict) -> tuple:
    c = r["config"]
    return (c["runner"], c["devices"], c["allreduce"], c["latency_ms"], c.get("bandwidth") or "", c["dtype"],
            c["window"], c.get("memory_budget") or "", c.get("no_scheduler", False), c.get("mem_limit") or "",
            c.get("cpus") or 0, c["tokens"])


def group(runs: list[dict]) -> list[dict]:
    """Repeats of one configuration -> one row with medians (and the count)."""
    by = defaultdict(list)
    for r in runs:
        by[key(r)].append(r)
    rows = []
    for k in sorted(by):
        rs = by[k]
        res = [r["result"] for r in rs]
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
            "load": [r["machine"]["loadavg"][0] for r in rs],
            # local: the mean per decode step; docker: the last decode step (/api/cluster)
            "comm": [(d.get("per_token") or d.get("last_forward") or {}).get("comm_s") for d in devs],
            "compute": [(d.get("per_token") or d.get("last_forward") or {}).get("compute_s") for d in devs],
            "disk": [(d.get("per_token") or d.get("last_forward") or {}).get("disk_wait_s") for d in devs],
        })
    return rows


def mib(b) -> str:
    return "–" if not b else f"{b / MiB:.0f}"


def link_text(c: dict) -> str:
    return c.get("link") or "none"


def commands(runs: list[dict]) -> str:
    cmds = sorted({r["command"] for r in runs})
    return "```\n" + "\n".join(cmds) + "\n```"


def machine_text(runs: list[dict]) -> str:
    if not runs:
        return ""
    m = runs[0]["machine"]
    loads = [r["machine"]["loadavg"][0] for r in runs] + [r.get("machine_after", r["machine"])["loadavg"][0] for r in runs]
    times = sorted(r["machine"]["time_utc"] for r in runs)
    caps = [r["machine_capability"] for r in runs if r.get("machine_capability")]
    s = (f"Machine: `nproc` = {m['nproc']}, {m['cpu_model']}, {m['mem_total_bytes'] / 2**30:.0f} GiB, "
         f"kernel {m['kernel']}; runs from {times[0]} to {times[-1]}; 1-minute load average "
         f"{min(loads):.1f}–{max(loads):.1f} on {m['nproc']} cores during the runs.")
    if caps:
        def rng(vals, fmt):
            return f"{fmt.format(min(vals))}–{fmt.format(max(vals))}"

        s += (" Measured at the start of each sweep (under that load): "
              f"{rng([c['capability']['gflops'] for c in caps], '{:.1f}')} GFLOP/s float32 (decode-shaped matmul, "
              f"`tpi.capability.measure()`), disk {rng([c['capability']['disk_mbps'] for c in caps], '{:.0f}')} MB/s, "
              f"memory copy {rng([c['mem_bandwidth_gbs'] for c in caps], '{:.1f}')} GB/s; each run's bounds use its "
              f"own sweep's figures.")
    return s


def testbed_table(rows: list[dict]) -> str:
    head = ("| runner | devices | all-reduce | link | dtype | window | budget / limit | TTFT (s) | ms/token | "
            "bound (ms) | latency / compute / memory / disk bound (ms) | planner (ms) | measured / bound | "
            "peak memory master / worker (MiB) | load |\n"
            "|---|---:|---|---|---|---:|---|---:|---:|---:|---|---:|---:|---|---:|\n")
    lines = []
    for r in rows:
        c, b = r["config"], r["bounds"]
        pl = b.get("planner") or {}
        planner = f"{pl['total_ms']:.0f}" if "total_ms" in pl else "–"
        ms = f"{r['ms']:.0f}" + (f" (n={r['n']})" if r["n"] > 1 else "")
        lines.append(
            f"| {c['runner']} | {c['devices']} | {c['allreduce'] if c['devices'] > 1 else '–'} | {link_text(c)} | "
            f"{c['dtype']} | {c['window']} | {c.get('memory_budget') or c.get('mem_limit') or 'none'} | "
            f"{r['ttft_s']:.2f} | {ms} | {b['bound_ms']:.0f} ({b['bound_by']}) | "
            f"{b['latency_ms']:.0f} / {b['compute_ms']:.1f} / {b['memory_ms']:.1f} / {b['disk_ms']:.1f} | {planner} | "
            f"{r['ms'] / b['bound_ms']:.1f}x | {mib(r['master_peak'])} / {mib(r['worker_peak'])} | "
            f"{statistics.median(r['load']):.1f} |")
    return head + "\n".join(lines) + "\n"


def breakdown_table(rows: list[dict]) -> str:
    head = ("| runner | devices | all-reduce | link | budget / limit | master compute / comm (ms/token) | "
            "workers compute / comm, mean (ms/token) |\n|---|---:|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        c = r["config"]
        if r["compute"][0] is None:
            continue
        wc = [x for x in r["compute"][1:] if x is not None]
        wm = [x for x in r["comm"][1:] if x is not None]
        w = f"{statistics.mean(wc) * 1e3:.0f} / {statistics.mean(wm) * 1e3:.0f}" if wc else "–"
        lines.append(f"| {c['runner']} | {c['devices']} | {c['allreduce'] if c['devices'] > 1 else '–'} | "
                     f"{link_text(c)} | {c.get('memory_budget') or c.get('mem_limit') or 'none'} | "
                     f"{r['compute'][0] * 1e3:.0f} / {r['comm'][0] * 1e3:.0f} | {w} |")
    return head + "\n".join(lines) + "\n" if lines else ""


def baseline_table(runs: list[dict]) -> str:
    head = ("| system | dtype | TTFT (s) | ms/token | peak RSS (MiB) | prompt tokens | torch threads | load |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in runs:
        c, x = r["config"], r["result"]
        lines.append(f"| {c['system']} | {c['dtype']} | {x['ttft_s']:.3f} | {x['token_latency_s'] * 1e3:.1f} | "
                     f"{mib(x['peak_rss_bytes'])} | {x['prompt_tokens']} | {x.get('torch_threads', '–')} | "
                     f"{r['machine']['loadavg'][0]:.1f} |")
    return head + "\n".join(lines) + "\n"


def plot_latency(rows: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in rows:
        c = r["config"]
        if c["devices"] > 1 and not c.get("bandwidth") and not c.get("memory_budget"):
            series[(c["runner"], c["devices"], c["allreduce"])].append(r)
    series = {k: v for k, v in series.items() if len({r["config"]["latency_ms"] for r in v}) > 1}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (runner, n, mode), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["config"]["latency_ms"])
        xs = [r["config"]["latency_ms"] for r in rs]
        line, = ax.plot(xs, [r["ms"] for r in rs], "o-", label=f"{mode}, {n} devices ({runner}): measured")
        ax.plot(xs, [r["bounds"]["bound_ms"] for r in rs], "--", color=line.get_color(),
                label=f"{mode}: bound (2·L·{rs[0]['bounds']['hops']} hops·latency + compute)")
    ax.set_xlabel("emulated one-way link latency (ms)")
    ax.set_ylabel("ms per token")
    ax.set_title("Token latency vs link latency (SmolLM2-135M, greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(rows: list[dict], baselines: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = defaultdict(dict)
    for r in rows:
        c = r["config"]
        if c["latency_ms"] == 0 and not c.get("bandwidth") and c["allreduce"] == "star" and not c.get("memory_budget"):
            pts[c["runner"]][c["devices"]] = r
    pts = {k: v for k, v in pts.items() if len(v) > 1}
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for runner, by_n in sorted(pts.items()):
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n]["master_peak"] / MiB for n in ns], "o-", label=f"master (device 0), {runner}")
        wn = [n for n in ns if by_n[n]["worker_peak"]]
        if wn:
            ax.plot(wn, [by_n[n]["worker_peak"] / MiB for n in wn], "s-", label=f"largest worker, {runner}")
    for b in baselines:
        if not b["config"]["offload"]:
            ax.axhline(b["result"]["peak_rss_bytes"] / MiB, ls=":", color="gray")
            ax.text(1, b["result"]["peak_rss_bytes"] / MiB, f" transformers {b['config']['dtype']}", fontsize=7,
                    va="bottom")
    ax.set_xticks(sorted({n for by_n in pts.values() for n in by_n}))
    ax.set_xlabel("devices")
    ax.set_ylabel("peak memory per device (MiB)")
    ax.set_title("Peak memory per device vs device count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def slopes(rows: list[dict]) -> str:
    """Measured ms/token per ms of link latency beside the bound's slope (2·L·hops)."""
    out = []
    series = defaultdict(list)
    for r in rows:
        c = r["config"]
        if c["devices"] > 1 and not c.get("bandwidth") and not c.get("memory_budget"):
            series[(c["runner"], c["devices"], c["allreduce"])].append(r)
    for (runner, n, mode), rs in sorted(series.items()):
        pts = sorted((r["config"]["latency_ms"], r["ms"]) for r in rs)
        if len(pts) < 2:
            continue
        xs, ys = zip(*pts)
        mx, my = statistics.mean(xs), statistics.mean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            continue
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        intercept = my - slope * mx
        layers_x_2 = None
        for r in rs:
            if r["config"]["latency_ms"]:
                layers_x_2 = r["bounds"]["latency_ms"] / r["config"]["latency_ms"]
                break
        out.append(f"| {mode} | {n} | {runner} | {slope:.0f} | {layers_x_2:.0f} | {slope / layers_x_2:.2f} | "
                   f"{intercept:.0f} |")
    if not out:
        return ""
    return ("| all-reduce | devices | runner | measured slope (ms/token per ms) | bound slope (2·L·hops) | ratio | "
            "fitted ms/token at 0 ms |\n|---|---:|---|---:|---:|---:|---:|\n" + "\n".join(out) + "\n")


def fold_page(path: Path, title: str) -> str:
    """A page's tables and fenced commands, in order, under a link to the page."""
    text = path.read_text()
    keep, in_code, in_table = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            keep.append(line)
            continue
        if in_code:
            keep.append(line)
            continue
        is_table = line.startswith("|")
        if is_table or line.startswith("#"):
            if line.startswith("#"):
                line = "####" + line.lstrip("#")
            keep.append(line)
        elif in_table:
            keep.append("")
        in_table = is_table
    # drop headings with no table or command under them
    lines = [x for x in keep if x.strip()]
    keep = [x for i, x in enumerate(keep)
            if not (x.startswith("####") and not any(not y.startswith("####") for y in
                                                     lines[lines.index(x) + 1:lines.index(x) + 2]))]
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip()
    return (f"### {title} (from [{path.name}]({path.name}))\n\nCopied from that page (its tables and the "
            f"commands that produced them; not re-measured here). Read the page for conditions and discussion.\n\n"
            f"{body}\n")


def discussion(rows: list[dict], baselines: list[dict]) -> str:
    """One line per configuration: measured beside its bound and where the devices' time went."""
    s = []
    for r in rows:
        c, b = r["config"], r["bounds"]
        label = f"{c['runner']}, {c['devices']} device(s)"
        if c["devices"] > 1:
            label += f", {c['allreduce']}, link {link_text(c)}"
        limit = c.get("memory_budget") or c.get("mem_limit")
        if limit:
            label += f", budget/limit {limit}"
        comm = [x for x in r["comm"][: c["devices"]] if x is not None]
        comp = [x for x in r["compute"][: c["devices"]] if x is not None]
        where = (f"; the devices computed {statistics.mean(comp) * 1e3:.0f} and waited in all-reduces "
                 f"{statistics.mean(comm) * 1e3:.0f} ms per step" if comm and comp and c["devices"] > 1 else "")
        s.append(f"- {label}: {r['ms']:.0f} ms/token, {r['ms'] / b['bound_ms']:.1f}x its bound of "
                 f"{b['bound_ms']:.0f} ms ({b['bound_by']}-bound; {b['latency_ms']:.0f} ms of it link latency = "
                 f"{b['hops']} hops x 60 all-reduces x latency){where}.")
    return "\n".join(s) + "\n"


def agreement(testbed: list[dict], baselines: list[dict]) -> str:
    """Do all systems produce the same greedy text from the same prompt tokens?"""
    texts = defaultdict(list)
    for r in testbed + baselines:
        c = r["config"]
        label = (f"{c['runner']} n={c['devices']}" if r["kind"] == "testbed" else f"transformers {c['dtype']}")
        texts[(r["result"].get("prompt_tokens"), r["result"]["text"])].append(label)
    if len(texts) == 1:
        (n, text), = texts
        return (f"All {len(testbed) + len(baselines)} runs (every tpi configuration and every baseline) had the "
                f"same {n} prompt tokens and produced the same greedy text: `{text.strip()}`.")
    return "Greedy outputs differ between runs:\n\n" + "\n".join(
        f"- {n} prompt tokens, `{t.strip()}`: {', '.join(sorted(set(labels)))}" for (n, t), labels in texts.items())


def error_line(text: str) -> str:
    """The line that says what went wrong (an `error:` line), else the last one."""
    lines = [x for x in text.strip().splitlines() if x.strip()]
    hits = [x for x in lines if " error: " in x] or [x for x in lines if "Error" in x and "failed (" not in x]
    return (hits[0] if hits else lines[-1] if lines else "?")[:300]


def write_report(args) -> int:
    results, out = Path(args.results), Path(args.out)
    testbed, baselines, failed = load(results)
    rows = group(testbed)
    docs = out.parent
    parts = ["# Benchmarks\n",
             "Generated by `tpi bench report` from `bench/results/*.json` (written by `tpi bench testbed` and "
             "`tpi bench baselines`; src/tpi/bench/). Edit the code, not this file. Model: SmolLM2-135M-Instruct "
             "(the embedded default; 30 layers, hidden 576, 9 query / 3 KV heads), greedy, the same prompt for "
             "every system. Token latency excludes the first token; TTFT is from request to first token with the "
             "weights already loaded.\n",
             "**The machine is shared and noisy.** It has 2 cores and other sessions' builds and tests ran on it "
             "throughout (load averages are given per run). Every emulated device also "
             "shares those same 2 cores, so adding devices adds no compute here. Read absolute figures as upper "
             "bounds and compare within one table.\n",
             machine_text(testbed + baselines) + "\n"]
    runners = {r["config"]["runner"] for r in rows}
    parts.append("## Emulated edge testbed\n")
    if "docker" not in runners or "local" in runners:
        parts.append("Runner `local` = `tpi generate --transport ws`: a master and N-1 worker processes on "
                     "loopback, links emulated in the transport (`--link`), **no per-device memory or CPU limit** "
                     "(peak memory is each process's VmHWM). Runner `docker` = one container per device from "
                     "tpi:latest with `mem_limit`/`nano_cpus`, the workload through the master's HTTP API, peak "
                     "memory = the container's cgroup `memory.max_usage_in_bytes` (page cache included; it can be below "
                     "the process's VmHWM because pages of shared files, such as torch's libraries, are charged to "
                     "the cgroup that first read them). "
                     "The containers are slow to start on this loaded machine (image start, torch import and "
                     "shard load per device), so the sweeps below ran with the local runner unless the table says "
                     "`docker`.\n")
    parts.append("Bounds per configuration (src/tpi/bench/bounds.py): latency = 2 all-reduces/layer x 30 layers x "
                 "hops x one-way latency (hops 2 for star, 2(N-1) for ring); compute = FLOPs per token / the "
                 "machine's measured GFLOP/s (the emulated devices share its cores); memory = weight bytes touched "
                 "per token / measured copy bandwidth; disk = the planner's re-read bytes / disk bandwidth (0 when "
                 "everything fits). Every all-reduce waits for the compute before it, so bound = latency + "
                 "max(compute, memory, disk). Planner = `tpi.planner.plan_cluster(...).estimate.total_ms` with "
                 "each device given 1/N of the measured machine (it models star links only: its ring figures use "
                 "2 hops).\n")
    if rows:
        parts.append(commands(testbed) + "\n")
        parts.append(testbed_table(rows) + "\n")
        bt = breakdown_table(rows)
        if bt:
            parts.append("Where the time goes (per decode step, from each device's own timers: the mean over the "
                         "run for `local`, the last step as /api/cluster reports it for `docker`; comm = waiting "
                         "in all-reduces, which includes waiting for the slowest device's compute):\n\n" + bt + "\n")
        if plot_latency(rows, docs / "bench-latency-vs-link.png"):
            parts.append("### Token latency vs link latency, star vs ring\n\n![latency vs link latency]"
                         "(bench-latency-vs-link.png)\n\n" + slopes(rows) + "\n")
        if plot_memory(rows, baselines, docs / "bench-memory-vs-devices.png"):
            parts.append("### Peak memory per device vs device count\n\n![memory vs devices]"
                         "(bench-memory-vs-devices.png)\n\nWithout a memory limit the scheduler keeps every "
                         "block a device owns resident, so a device's peak is the ~220 MB torch runtime floor plus "
                         "its 1/N of the layers; the master also holds the embedding/LM head (tied, 49152 x 576).\n")
    parts.append("## Baselines: Hugging Face transformers\n")
    if baselines:
        parts.append("Whole model in one process (`AutoModelForCausalLM.generate`, greedy, `min_new_tokens` = "
                     "tokens); TTFT = generate(1 token); token latency = (generate(T) - generate(1)) / (T-1); "
                     "medians of the rounds after a warm-up; peak RSS = VmHWM of a fresh process.\n\n"
                     + agreement(testbed, baselines) + "\n\n"
                     + commands(baselines) + "\n" + baseline_table(baselines) + "\n")
    else:
        parts.append("No baseline results yet: `tpi bench baselines`.\n")
    parts.append("## Discussion: where the system is far from its bound, and why\n")
    parts.append(discussion(rows, baselines) + "\n")
    notes = Path(__file__).with_name("discussion.md")
    if notes.exists():
        parts.append(notes.read_text() + "\n")
    if failed:
        parts.append("## Runs that failed\n\n" + "\n".join(
            f"- `{Path(f['_file']).name}`: {error_line(f['error'])}" for f in failed) + "\n")
    parts.append("## Other benchmark pages\n")
    seen = set()
    for page, title in OTHER_PAGES:
        p = Path(page)
        if p.exists() and title not in seen:
            seen.add(title)
            if page in LINK_ONLY:
                parts.append(f"### {title}\n\nThat page holds no measured table to copy; "
                             f"the design, budgets and options are in [{p.name}]({p.name}).\n")
            else:
                parts.append(fold_page(p, title))
    out.write_text("\n".join(parts))
    print(f"wrote {out} ({len(rows)} configurations, {len(baselines)} baselines, {len(failed)} failed runs)")
    return 0
