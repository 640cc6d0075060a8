"""`tpi bench report`: docs/benchmarks.md and its plots, regenerated from bench/results/*.json
(written by `tpi bench testbed` and `tpi bench baselines`), one section per model, plus the
figures of the other benchmark pages folded in (their tables and commands, copied, not
re-measured). The discussion is computed (findings.py); only preface.md is hand-written."""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from tpi.bench import findings, plots

MiB = 2**20
OTHER_PAGES = [  # (file, title) folded into the report when present
    ("docs/benchmarks-allreduce.md", "All-reduce latency"),
    ("docs/benchmarks-inproc.md", "In-process engine vs transformers"),
    ("docs/benchmarks-batching.md", "Batched decoding"),
    ("docs/benchmarks-memory.md", "Memory scheduler"),
    ("docs/memory-scheduler.md", "Memory scheduler"),  # a design page: linked, not copied
]
LINK_ONLY = {"docs/memory-scheduler.md"}


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
    disks = [x for c in caps for x in (c["capability"]["disk_mbps"], c.get("disk_parallel_mbps")) if x]
    s = (f"Machine: `nproc` = {m['nproc']}, {m['cpu_model']}, {m['mem_total_bytes'] / 2**30:.0f} GiB, "
         f"kernel {m['kernel']}; runs from {times[0]} to {times[-1]}; 1-minute load average "
         f"{min(loads):.1f}–{max(loads):.1f} on {m['nproc']} cores during the runs.")
    if caps:
        def rng(vals, fmt):
            return f"{fmt.format(min(vals))}–{fmt.format(max(vals))}"

        s += (" Measured at the start of each sweep (under that load): "
              f"{rng([c['capability']['gflops'] for c in caps], '{:.1f}')} GFLOP/s float32 (decode-shaped matmul, "
              f"`tpi.capability.measure()`), disk {rng(disks, '{:.0f}')} MB/s (one 16 MB reader, or as many "
              f"128 MB readers at once as the sweep had devices), memory copy "
              f"{rng([c['mem_bandwidth_gbs'] for c in caps], '{:.1f}')} GB/s. The bounds take the best GFLOP/s, "
              f"disk rate and copy rate measured in any sweep (a bound assumes the machine at its best).")
    return s


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
    base = [r for r in rows if r["config"]["latency_ms"] == 0 and r["config"]["allreduce"] == "star"
            and not r["config"].get("bandwidth")]
    if not base:
        return ""
    n = findings.table_devices(base)
    base = sorted((r for r in base if r["config"]["devices"] == n),
                  key=lambda r: (not r["config"].get("no_scheduler"), r["config"].get("memory_budget") or "~"))
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


def agreement(testbed: list[dict], baselines: list[dict]) -> str:
    """Do all systems produce the same greedy text from the same prompt tokens?"""
    texts = defaultdict(list)
    for r in testbed + baselines:
        c = r["config"]
        label = (f"tpi {c['runner']} n={c['devices']} {c['dtype']}" if r["kind"] == "testbed"
                 else f"{c['system']} {c['dtype']}")
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


MODELS = {  # short name -> what the section calls it (others: their directory's name)
    "smollm2": "SmolLM2-135M-Instruct (the embedded default: 30 layers, hidden 576, 9 query / 3 KV heads)",
    "llama2-7b-8l": ("Llama-2-7B shape truncated to 8 layers, random weights, bfloat16 (hidden 4096, MLP 11008, "
                     "32 heads, vocab 32000; 1.9 B parameters, 3.76 GB; `bench/memory.py make-model`; it carries "
                     "SmolLM2's tokenizer, whose ids for the prompt fit its vocabulary, so the same text prompt "
                     "works; its output text is meaningless)"),
}
SHORT = {"smollm2": "SmolLM2-135M", "llama2-7b-8l": "Llama-2-7B shape, 8 layers"}
MEMORY_70B = ("70b", "Llama-3.1-70B")  # results whose file name or model names one of these fill the 70B slot


def model_section(name: str, runs: list[dict], baselines: list[dict], docs: Path) -> str:
    rows = group(runs)
    title = MODELS.get(name, name)
    short = SHORT.get(name, name)
    parts = [f"## {title.split(' (')[0]}\n", f"Model: {title}. Greedy, the same prompt and token count for every system of this "
             f"section.\n", machine_text(runs + baselines) + "\n"]
    pt = paper_table(rows, baselines)
    if pt:
        parts.append("### TTFT, token latency and peak memory (the paper's table)\n\nAt 0 ms star links with the "
                     "device count that has the most variants measured; the baselines are one process. Medians of "
                     "n runs. Peak memory: VmHWM (RSS) and, in a container or cgroup, its peak usage (page cache "
                     "included); a process without either shows its VmHWM alone.\n\n" + pt + "\n")
    if rows:
        parts.append("### Every configuration, beside its bound and the planner\n\n" + commands(runs) + "\n"
                     + testbed_table(rows) + "\n")
        bt = breakdown_table(rows)
        if bt:
            parts.append("Where the time goes per decode step, from each device's own timers (`local`: the mean over "
                         "the run; `docker`: the mean of the decode steps sampled from /api/cluster every 0.25 s while "
                         "the tokens streamed, or for older runs the last step only; medians over the repeats). comm = waiting in all-reduces, which includes waiting for the slowest device's "
                         "compute; disk wait = the scheduler waiting for a block being read.\n\n" + bt + "\n")
    slug = name.replace("/", "-")
    figures = [
        ("latency vs link latency", f"bench-{slug}-latency-vs-link.png", lambda p: plots.plot_latency(rows, short, p)),
        ("memory vs devices", f"bench-{slug}-memory-vs-devices.png",
         lambda p: plots.plot_memory(rows, [b for b in baselines if not b["config"].get("offload")], short, p)),
        ("latency vs memory budget", f"bench-{slug}-latency-vs-budget.png",
         lambda p: plots.plot_budget(rows, baselines, short, p)),
    ]
    drawn = [(t, f) for t, f, draw in figures if draw(docs / f)]
    if drawn:
        parts.append("### Plots\n\nFrom the rows above (same commands, same machine).\n\n"
                     + "\n\n".join(f"![{t}]({f})" for t, f in drawn) + "\n")
    missing = [t for t, f, _ in figures if (t, f) not in drawn]
    if missing:
        parts.append(f"No plot of {', '.join(missing)}: the results hold too few points for it.\n")
    if baselines:
        parts.append("### Baselines\n\nTransformers with the whole model in one process (no limit), and with "
                     "Accelerate disk offload (`device_map=\"auto\"`, `max_memory` = the per-device budget, "
                     "`offload_folder`) in a cgroup of the stated limit; page cache dropped before each; TTFT = "
                     "generate(1 token), token latency = (generate(T) - generate(1)) / (T-1), median of the rounds "
                     "after a warm-up.\n\n" + agreement(runs, baselines) + "\n\n" + commands(baselines) + "\n"
                     + baseline_table(baselines) + "\n")
    if rows:
        parts.append("### Where it is far from its bound, and why (computed from the rows above)\n\n"
                     + findings.discussion(rows, baselines) + "\n")
    return "\n".join(parts)


def memory_70b_runs(other: list[dict], docs: Path) -> list[tuple[str, str, dict]]:
    """(file, variant, run) for every 70B-shaped memory run: results JSONs in bench/results or
    docs/ whose name contains 70b, each a run with `devices` or a dict of such runs by variant."""
    found = []
    files = [(r["_file"], r) for r in other] + [(str(p), json.loads(p.read_text()))
                                                for p in sorted(docs.glob("*70b*.json"))]
    for f, r in files:
        if not any(k.lower() in (Path(f).name + str(r.get("model", ""))).lower() for k in MEMORY_70B):
            continue
        if isinstance(r.get("devices"), list):
            found.append((f, "", r))
        else:
            found += [(f, k, v) for k, v in r.items() if isinstance(v, dict) and isinstance(v.get("devices"), list)]
    return found


def memory_70b_section(other: list[dict], docs: Path) -> str:
    head = "## Llama-3.1-70B shape: memory test\n\n"
    pages = [p for p in sorted(docs.glob("benchmarks-*.md")) if "70b" in p.name.lower()]
    runs = memory_70b_runs(other, docs)
    if not runs:
        return head + ("Slot for the 70B-shaped memory test (hidden 8192, 64 heads, 8 KV heads, MLP 28672, vocab "
                       "128256, a few layers, 8 devices, window 2). No results file for it yet: a JSON in "
                       "bench/results/ or docs/ whose name contains `70b` is folded in here by `tpi bench report`.\n")
    out = [head + "Peak memory per device of the 70B-shaped model (its own benchmark, `bench/memory70b.py`, "
                  "not re-measured here: this section reads its results file). Bound = idle RSS + (window + 1) x "
                  "the largest piece + KV cache; \"80 layers\" = the peak with the KV cache of all 80 layers "
                  "counted, as the full model would hold it.\n"]
    for f, variant, r in runs:
        devs = r["devices"]
        lim = r.get("limit")
        load = r.get("loadavg_end") or r.get("loadavg")
        out.append(f"### {r.get('model', '70B shape')}" + (f", {variant.replace('_', ' ')}" if variant else "") + "\n\n"
                   + f"From `{Path(f).name}`; {r.get('world', len(devs))} devices, window {r.get('window', '?')}, "
                   f"context {r.get('max_seq', '?')}, limit {mib(lim)} MiB per device"
                   + (f", load {load[0]:.1f} at the end" if load else "") + ".\n\n"
                   + (f"```\n{r['command']}\n```\n" if r.get("command") else ""))
        rows = [f"| {d.get('rank')} | {d.get('role', '')} | {mib(d.get('idle_rss'))} | {mib(d.get('peak_rss'))} | "
                f"{mib(d.get('cgroup_peak'))} | {mib(d.get('bound'))} | {mib(d.get('peak_80_layers'))} | "
                f"{'yes' if d.get('oom_killed') else 'no'} |" for d in devs]
        out.append("| rank | role | idle RSS (MiB) | peak RSS (MiB) | cgroup peak (MiB) | bound (MiB) | peak, 80 layers "
                   "(MiB) | OOM-killed |\n|---:|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n")
        peaks = [d.get("peak_rss") or 0 for d in devs]
        p80 = [d.get("peak_80_layers") or 0 for d in devs]
        s = (f"Largest peak RSS {max(peaks) / 1e9:.2f} GB (device {peaks.index(max(peaks))}), "
             f"{sum(p <= (d.get('bound') or 0) for p, d in zip(peaks, devs))} of {len(devs)} devices within their "
             f"bound")
        if lim:
            s += (f"; every device at most {max(peaks) / lim:.0%} of its {lim / 1e9:.1f} GB limit, "
                  f"{max(p80) / lim:.0%} with the 80-layer KV cache")
        out.append(s + ".\n")
    if pages:
        out.append("The discussion is in " + ", ".join(f"[{p.name}]({p.name})" for p in pages) + ".\n")
    return "\n".join(out)


def first_heading(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return path.stem


def write_report(args) -> int:
    results, out = Path(args.results), Path(args.out)
    testbed, baselines, failed, other = load(results)
    recompute_bounds(testbed)
    docs = out.parent
    names = sorted({model_of(r) for r in testbed + baselines},
                   key=lambda m: (list(MODELS).index(m) if m in MODELS else len(MODELS), m))
    parts = ["# Benchmarks\n",
             "Generated by `tpi bench report` from `bench/results/*.json` (written by `tpi bench testbed` and "
             "`tpi bench baselines`, src/tpi/bench/; the sweeps are `bench/sweeps.sh`). Edit the code, not this "
             "file. Token latency excludes the first token; TTFT is from request to first token with the weights "
             "already prepared. Older results are kept, unreported, in subfolders of bench/results/.\n",
             machine_text(testbed + baselines) + "\n",
             Path(__file__).with_name("preface.md").read_text() + "\n",
             "## How to read the tables\n",
             "Runner `local` = `tpi generate --transport ws`: a master and N-1 worker processes on loopback, links "
             "emulated in the transport (`--link`), no per-device memory limit (peak memory = each process's "
             "VmHWM) and the page cache not dropped, so a `--memory-budget` there limits what the scheduler holds "
             "but the blocks it re-reads may come from the page cache, not the disk (BENCHMARKING.md, \"The "
             "page-cache trap\"); the container runs are the ones with real limits. Runner `docker` = one container per device from tpi:latest with its own `mem_limit`, the "
             "model copied into a volume and split into shard stores before the run (so a device's peak is not "
             "the splitter's), the page cache dropped before each run, the workload through the master's HTTP API "
             "(streamed `/v1/completions`); peak memory = the container's cgroup `memory.max_usage_in_bytes` "
             "(page cache included).\n",
             "Bounds per configuration (src/tpi/bench/bounds.py, recomputed by the report from each run's "
             "configuration and its sweep's measurements of the machine): latency = 2 all-reduces per layer x "
             "layers x hops x one-way link latency (hops 2 for star, 2(N-1) for ring); compute = FLOPs per token / "
             "the machine's measured float32 GFLOP/s (the emulated devices share its cores); memory = weight bytes "
             "touched per token / measured copy bandwidth; disk = the bytes the planner says the devices re-read "
             "per token, summed (they share one disk) / measured disk bandwidth; with a container limit and no "
             "explicit budget, the runtime's default-budget rule (limit - idle RSS of 220 MB - headroom) gives "
             "the budgets. Every all-reduce waits for the compute before it, so bound = latency + max(compute, "
             "memory, disk). Planner = `tpi.planner.plan_cluster(...).estimate.total_ms` with each device given "
             "1/N of the measured machine (it models star links: its ring figures use 2 hops).\n"]
    for name in names:
        parts.append(model_section(name, [r for r in testbed if model_of(r) == name],
                                   [b for b in baselines if model_of(b) == name], docs))
    parts.append(memory_70b_section(other, docs))
    if failed:
        parts.append("## Runs that failed\n\n" + "\n".join(
            f"- `{Path(f['_file']).name}` ({f['machine']['time_utc']}, load {f['machine']['loadavg'][0]:.1f}): "
            f"{error_line(f['error'])}" for f in failed) + "\n")
    parts.append("## Other benchmark pages\n")
    seen = set()
    listed = {page for page, _ in OTHER_PAGES} | {str(out)}
    extra = [(str(p), first_heading(p)) for p in sorted(docs.glob("benchmarks-*.md")) if str(p) not in listed]
    for page, title in OTHER_PAGES + extra:
        p = Path(page)
        if p.exists() and title not in seen:
            seen.add(title)
            if page in LINK_ONLY:
                parts.append(f"### {title}\n\nThat page holds no measured table to copy; "
                             f"the design, budgets and options are in [{p.name}]({p.name}).\n")
            else:
                parts.append(fold_page(p, title))
    out.write_text("\n".join(parts))
    print(f"wrote {out} ({len(testbed)} runs in {len(group(testbed))} configurations, {len(baselines)} baselines, "
          f"{len(failed)} failed runs, models: {', '.join(names)})")
    return 0
