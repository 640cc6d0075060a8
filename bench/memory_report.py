"""The memory benchmark's results read back: a Markdown table of medians with the target
checks (`bench/memory.py report`) and a bar chart (`bench/memory.py plot`)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

GiB, MiB = 1 << 30, 1 << 20


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json).read_text())
    names = list(dict.fromkeys(r["system"] for r in data["runs"]))
    med = {}
    for n in names:
        runs = [r for r in data["runs"] if r["system"] == n and r.get("token_latency_s")]
        if not runs:
            continue
        med[n] = (statistics.median(r["token_latency_s"] for r in runs),
                  statistics.median(r["ttft_s"] for r in runs),
                  max(max((d.get("peak_rss") or 0) for d in (r["devices"][1:] or r["devices"])) for r in runs) / GiB)
    names = list(med)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    colors = ["#888888" if "accelerate" in n or "transformers" in n else "#1f77b4" for n in names]
    for ax, k, label in zip(axes, range(3), ["ms / token (decode, median)", "TTFT s (median)", "peak RSS GiB, devices 1-3 (device 0: + head)"]):
        vals = [med[n][k] * (1000 if k == 0 else 1) for n in names]
        ax.barh(names, vals, color=colors)
        ax.set_title(label)
        ax.invert_yaxis()
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.0f}" if k == 0 else f" {v:.2f}", va="center", fontsize=8)
    fig.suptitle(f"{data['model']}, {data['world']} devices, per-device limit {data['limit'] / GiB:.2f} GiB "
                 f"(+head on device 0), {data['tokens']} new tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


def cmd_report(args) -> None:
    """Markdown table of medians and the target checks, from one or more result files."""
    runs, data = [], None
    for f in args.json:
        d = json.loads(Path(f).read_text())
        data = data or d
        runs += d["runs"]
    names = list(dict.fromkeys(r["system"] for r in runs))
    fmt = lambda b: "-" if not b else f"{b / GiB:.2f}"
    rows, med = [], {}
    print("| system | limit per device (GiB) | TTFT s | ms/token | ms/token runs | peak RSS per device (GiB) | cgroup peak per device (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        rs = [r for r in runs if r["system"] == n]
        ok = [r for r in rs if r.get("token_latency_s")]
        lim = rs[0]["limits"]
        limit = "none" if all(x is None for x in lim) else " / ".join(fmt(x) if x else "none" for x in lim[:2]) + (" ..." if len(lim) > 2 else "")
        if not ok:
            codes = [r["exit_codes"] for r in rs]
            print(f"| {n} | {limit} | failed {codes} (OOM: {[any(d['oom_killed'] for d in r['devices']) for r in rs]}) | | | | |")
            continue
        tok = statistics.median(r["token_latency_s"] for r in ok)
        ttft = statistics.median(r["ttft_s"] for r in ok)
        peaks = [max((r["devices"][i].get("peak_rss") or 0) for r in ok) for i in range(len(ok[0]["devices"]))]
        cgp = [max(r["devices"][i]["cgroup_peak"] for r in ok) for i in range(len(ok[0]["devices"]))]
        med[n] = dict(tok=tok, ttft=ttft, peaks=peaks, run=ok[0])
        each = ", ".join(str(round(r["token_latency_s"] * 1000)) for r in ok)
        print(f"| {n} | {limit} | {ttft:.1f} | {tok * 1000:.0f} | {each} "
              f"| {' / '.join(fmt(p) for p in peaks)} | {' / '.join(fmt(p) for p in cgp)} |")
    print()
    for w in (2, 4):
        n = f"tpi window {w}"
        if n not in med:
            continue
        for dev in med[n]["run"]["devices"]:
            bound = dev["idle_rss"] + (w + 1) * dev["largest_block"] + dev["kv_bytes"] + dev.get("head_bytes", 0)
            peak = med[n]["peaks"][dev["rank"]]
            print(f"- window {w}, device {dev['rank']}: peak {fmt(peak)} GiB <= idle {fmt(dev['idle_rss'])} + "
                  f"{w + 1} x {dev['largest_block'] / MiB:.0f} MiB + KV {dev['kv_bytes'] / MiB:.1f} MiB"
                  + (f" + head {dev['head_bytes'] / MiB:.0f} MiB" if dev.get("head_bytes") else "")
                  + f" = {fmt(bound)} GiB: {'yes' if peak <= bound else 'NO'}")
    acc = med.get("accelerate disk offload")
    if acc:
        for n in ("tpi default budget", "tpi window 2", "tpi retention 75%", "tpi int8", "tpi int4"):
            if n in med:
                print(f"- Accelerate / {n}: {acc['tok'] / med[n]['tok']:.2f}x (target >= 5x)")
    if "tpi scheduler off" in med and "tpi budget holds slice" in med:
        print(f"- budget holding the slice / scheduler off: {med['tpi budget holds slice']['tok'] / med['tpi scheduler off']['tok']:.2f}x (target <= 1.2x)")
