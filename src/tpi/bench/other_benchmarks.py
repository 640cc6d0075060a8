"""What other benchmarks measured, folded into docs/benchmarks.md without re-measuring: the
70B-shaped memory test's results (bench/memory70b.py) and the other benchmark pages' tables
and commands (docs/benchmarks-*.md)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from tpi.bench.tables import mib

OTHER_PAGES = [  # (file, title) folded into the report when present
    ("docs/benchmarks-decode.md", "Decode speed and memory with default flags"),
    ("docs/benchmarks-allreduce.md", "All-reduce latency"),
    ("docs/benchmarks-inproc.md", "In-process engine vs transformers"),
    ("docs/benchmarks-batching.md", "Batched decoding"),
    ("docs/benchmarks-speculative.md", "Speculative decoding"),
    ("docs/benchmarks-memory.md", "Memory scheduler"),
    ("docs/benchmarks-moe.md", "Mixture of experts on 1 GiB devices"),
    ("docs/memory-scheduler.md", "Memory scheduler"),  # a design page: linked, not copied
]
LINK_ONLY = {"docs/memory-scheduler.md"}
MEMORY_70B = ("70b", "Llama-3.1-70B")  # results whose file name or model names one of these fill the 70B slot


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



def first_heading(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return path.stem



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
                  "not re-measured here: this section reads its results file). Bound: with a budget flag, idle RSS + "
                  "(window + 1) x the largest piece + KV cache, and \"80 layers\" = the peak with the KV cache of all "
                  "80 layers counted, as the full model would hold it; with default flags the budget is derived from "
                  "the device's limit, so the bound is the limit (an 80-layer KV cache would come out of the same "
                  "budget).\n"]
    for f, variant, r in runs:
        devs = r["devices"]
        lim = r.get("limit")
        load = r.get("loadavg_end") or r.get("loadavg")
        conditions = [f"{r.get('world', len(devs))} devices"] + [f"{k} {r[key]}" for k, key in
                                                                 (("window", "window"), ("context", "max_seq")) if key in r]
        conditions.append(f"limit {mib(lim)} MiB per device" if lim else "no limit (every block resident)")
        out.append(f"### {r.get('model', '70B shape')}" + (f", {variant.replace('_', ' ')}" if variant else "") + "\n\n"
                   + f"From `{Path(f).name}`; " + ", ".join(conditions)
                   + (f", load {load[0]:.1f} at the end" if load else "") + ".\n\n"
                   + (f"```\n{r['command']}\n```\n" if r.get("command") else "")
                   + (f"(the product's command: `{r['product_command']}`)\n" if r.get("product_command") else ""))
        rows = [f"| {d.get('rank')} | {d.get('role', '')} | {mib(d.get('idle_rss'))} | {mib(d.get('peak_rss'))} | "
                f"{mib(d.get('cgroup_peak'))} | {mib(d.get('bound'))} | {mib(d.get('peak_80_layers'))} | "
                f"{'yes' if d.get('oom_killed') else 'no'} |" for d in devs]
        out.append("| rank | role | idle RSS (MiB) | peak RSS (MiB) | cgroup peak (MiB) | bound (MiB) | peak, 80 layers "
                   "(MiB) | OOM-killed |\n|---:|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n")
        peaks = [d.get("peak_rss") or 0 for d in devs]
        p80 = [d.get("peak_80_layers") or 0 for d in devs]
        s = f"Largest peak RSS {max(peaks) / 1e9:.3f} GB (device {peaks.index(max(peaks))})"
        if any(d.get("bound") for d in devs):
            s += f", {sum(p <= (d.get('bound') or 0) for p, d in zip(peaks, devs))} of {len(devs)} devices within their bound"
        s += f"; {sum(p <= 1e9 for p in peaks)} of {len(devs)} at most 1.0 GB"
        if lim:
            s += f"; every device at most {max(peaks) / lim:.0%} of its {lim / 1e9:.1f} GB limit"
            if any(p80):
                s += f", {max(p80) / lim:.0%} with the 80-layer KV cache"
        out.append(s + ".\n")
    if pages:
        out.append("The discussion is in " + ", ".join(f"[{p.name}]({p.name})" for p in pages) + ".\n")
    return "\n".join(out)


def other_pages(docs: Path, out: Path) -> list[str]:
    """The section of the other benchmark pages: each page folded in once (by title), a design
    page linked; `out`, the report itself, is not one of them."""
    parts = ["## Other benchmark pages\n"]
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
    return parts
