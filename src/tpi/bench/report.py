"""`tpi bench report`: docs/benchmarks.md and its plots, regenerated from bench/results/*.json
(written by `tpi bench testbed` and `tpi bench baselines`), one section per model, plus the
figures of the other benchmark pages folded in (their tables and commands, copied, not
re-measured). The discussion is computed (findings.py); only preface.md is hand-written."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tpi.bench import findings, plots
from tpi.bench.other_benchmarks import memory_70b_section, other_pages
from tpi.bench.results import group, load, model_of, recompute_bounds
from tpi.bench.tables import baseline_table, breakdown_table, paper_table, testbed_table

MODELS = {  # short name -> what the section calls it (others: their directory's name)
    "smollm2": "SmolLM2-135M-Instruct (the embedded default: 30 layers, hidden 576, 9 query / 3 KV heads)",
    "llama2-7b-8l": ("Llama-2-7B shape truncated to 8 layers, random weights, bfloat16 (hidden 4096, MLP 11008, "
                     "32 heads, vocab 32000; 1.9 B parameters, 3.76 GB; `bench/memory.py make-model`; it carries "
                     "SmolLM2's tokenizer, whose ids for the prompt fit its vocabulary, so the same text prompt "
                     "works; its output text is meaningless)"),
}
SHORT = {"smollm2": "SmolLM2-135M", "llama2-7b-8l": "Llama-2-7B shape, 8 layers"}


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
              f"`tpi.cluster.capability.measure()`), disk {rng(disks, '{:.0f}')} MB/s (one 16 MB reader, or as many "
              f"128 MB readers at once as the sweep had devices), memory copy "
              f"{rng([c['mem_bandwidth_gbs'] for c in caps], '{:.1f}')} GB/s. The bounds take the best GFLOP/s, "
              f"disk rate and copy rate measured in any sweep (a bound assumes the machine at its best).")
    return s


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


def write_report(results: Path, out: Path) -> int:
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
             "memory, disk). Planner = `tpi.cluster.planner.plan_cluster(...).estimate.total_ms` with each device given "
             "1/N of the measured machine (it models star links: its ring figures use 2 hops).\n"]
    for name in names:
        parts.append(model_section(name, [r for r in testbed if model_of(r) == name],
                                   [b for b in baselines if model_of(b) == name], docs))
    parts.append(memory_70b_section(other, docs))
    if failed:
        parts.append("## Runs that failed\n\n" + "\n".join(
            f"- `{Path(f['_file']).name}` ({f['machine']['time_utc']}, load {f['machine']['loadavg'][0]:.1f}): "
            f"{error_line(f['error'])}" for f in failed) + "\n")
    parts += other_pages(docs, out)
    out.write_text("\n".join(parts))
    print(f"wrote {out} ({len(testbed)} runs in {len(group(testbed))} configurations, {len(baselines)} baselines, "
          f"{len(failed)} failed runs, models: {', '.join(names)})")
    return 0
