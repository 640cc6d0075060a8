"""`tpi bench testbed` (local runner), `tpi bench baselines` and `tpi bench report`, for real:
a short sweep on SmolLM2 (2 devices, 0 and 1 ms links, 3 tokens) and one transformers
baseline write results JSONs, and the report built from them must carry their figures, the
bounds recomputed from their configurations, a plot and the computed discussion.

About two minutes on the 2-core machine. The docker runner is exercised by bench/sweeps.sh
against a real engine, not here (CI has no image at test time)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tpi.bench.sweep import Sweep, configs


def tpi(*args: str, cwd: Path) -> str:
    p = subprocess.run([sys.executable, "-m", "tpi_cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def sweep(**kw) -> Sweep:
    return Sweep(**{**dict(runner="local", devices=(1, 2), latencies_ms=(0, 5), allreduce=("star", "ring"),
                           tokens=4, prompt="x"), **kw})


def test_sweep_configurations():
    names = [c.name() for c in configs(sweep())]
    # one device: no link and no all-reduce to vary
    assert names == ["smollm2-local-n1-star-lat0ms-bfloat16-w2", "smollm2-local-n2-star-lat0ms-bfloat16-w2",
                     "smollm2-local-n2-ring-lat0ms-bfloat16-w2", "smollm2-local-n2-star-lat5ms-bfloat16-w2",
                     "smollm2-local-n2-ring-lat5ms-bfloat16-w2"]
    cs = configs(sweep(devices=(2,), latencies_ms=(0,), allreduce=("star",), budgets=(None, "60MB"),
                       schedulers=("on", "off"), mem_limits=("1g", None), master_mem_limit="1536m"))
    off = [c for c in cs if c.no_scheduler]
    assert {c.memory_budget for c in off} == {None}  # scheduler off: no budget to vary
    assert {(c.mem_limit, c.master_mem_limit) for c in cs} == {("1g", "1536m"), (None, None)}
    assert len(cs) == 2 * 2 + 2  # (budget none/60MB) x (limit 1g/none) with the scheduler, + off x limits


@pytest.fixture(scope="module")
def results(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("bench")
    out = root / "results"
    tpi("bench", "testbed", "--runner", "local", "--devices", "2", "--latencies", "0,1", "--tokens", "3",
        "--timeout", "600", "--out", str(out), cwd=root)
    tpi("bench", "baselines", "--dtype", "bfloat16", "--systems", "whole", "--tokens", "3", "--rounds", "1",
        "--out", str(out), cwd=root)
    (root / "docs").mkdir()
    printed = tpi("bench", "report", "--results", str(out), "--out", str(root / "docs" / "benchmarks.md"), cwd=root)
    return root, printed


def test_results_record_their_conditions(results):
    root, _ = results
    runs = [json.loads(p.read_text()) for p in sorted((root / "results").glob("*.json"))]
    assert sorted(r["kind"] for r in runs) == ["baseline", "testbed", "testbed"]
    for r in runs:
        assert "error" not in r, r.get("error")
        assert len(r["machine"]["loadavg"]) == 3 and r["command"].startswith("tpi bench ")
        assert r["result"]["tokens"] == 3
    tb = [r for r in runs if r["kind"] == "testbed"]
    assert {r["config"]["latency_ms"] for r in tb} == {0.0, 1.0}
    for r in tb:
        assert len(r["result"]["devices"]) == 2
        assert all(d["per_token"]["compute_s"] > 0 for d in r["result"]["devices"])
    # every system decoded the same greedy tokens from the same prompt
    assert len({r["result"]["text"] for r in runs}) == 1


def test_report_carries_the_results(results):
    from tpi.bench.bounds import bounds
    from tpi.config import load_model_config
    from tpi.weights.sources import resolve_model

    root, printed = results
    text = (root / "docs" / "benchmarks.md").read_text()
    assert "3 runs" not in printed and "2 runs in 2 configurations, 1 baselines" in printed
    assert "## SmolLM2-135M-Instruct" in text
    assert "### TTFT, token latency and peak memory (the paper's table)" in text
    assert "### Where it is far from its bound, and why (computed from the rows above)" in text
    assert "**Gap to the bound.**" in text and "**Link latency.**" in text
    assert "No results file for it yet" in text  # the 70B slot (the test's docs/ has none)
    assert (root / "docs" / "bench-smollm2-latency-vs-link.png").stat().st_size > 10_000
    cfg = load_model_config(resolve_model(None))
    for p in (root / "results").glob("smollm2-local-*.json"):
        r = json.loads(p.read_text())
        ms = r["result"]["token_latency_s"] * 1e3
        b = bounds(cfg, {**r["config"], "bandwidth_bytes_s": None}, r["machine_capability"])
        row = next(line for line in text.splitlines()
                   if line.startswith("| local | 2 |") and f"| {r['config']['link'] or 'none'} |" in line)
        assert f"| {ms:.0f} (n=1) |" in row and f"| {b['bound_ms']:.0f} ({b['bound_by']}) |" in row
        assert f"| {ms / b['bound_ms']:.1f}x |" in row
    base = json.loads(next((root / "results").glob("smollm2-hf-*.json")).read_text())["result"]
    assert f"| {base['token_latency_s'] * 1e3:.0f} (n=1) |" in text
    # the discussion's median gap is the median of the table's gaps
    gaps = []
    for p in (root / "results").glob("smollm2-local-*.json"):
        r = json.loads(p.read_text())
        b = bounds(cfg, {**r["config"], "bandwidth_bytes_s": None}, r["machine_capability"])
        gaps.append(r["result"]["token_latency_s"] * 1e3 / b["bound_ms"])
    assert f"is {statistics.median(gaps):.1f}x its physical bound at the median" in text


def test_prompt_must_fit_the_vocabulary(smollm2_dir):
    from tpi.bench.testbed import check_prompt

    check_prompt(smollm2_dir, "The history of the printing press begins", 49152)
    with pytest.raises(SystemExit, match="beyond the vocabulary of 1000"):
        check_prompt(smollm2_dir, "The history of the printing press begins", 1000)


def test_the_70b_memory_results_fill_their_slot(tmp_path):
    """The 70B-shaped memory test's own results file (docs/benchmarks-memory-70b.json, from
    bench/memory70b.py) is read into the report's 70B section, device by device."""
    from tpi.bench.other_benchmarks import memory_70b_section

    src = Path(__file__).resolve().parents[2] / "docs" / "benchmarks-memory-70b.json"
    if not src.is_file():
        pytest.skip("no 70B results in docs/")
    (tmp_path / src.name).write_text(src.read_text())
    text = memory_70b_section([], tmp_path)
    data = json.loads(src.read_text())
    runs = [v for v in data.values() if isinstance(v, dict) and "devices" in v] if "devices" not in data else [data]
    assert runs
    for run in runs:
        for d in run["devices"]:
            assert f"| {d['rank']} | {d['role']} | {d['idle_rss'] / 2**20:.0f} | {d['peak_rss'] / 2**20:.0f} |" in text
        peak = max(d["peak_rss"] for d in run["devices"])
        assert f"Largest peak RSS {peak / 1e9:.3f} GB" in text


def test_default_flag_70b_runs_are_judged_against_the_limit_or_1gb(tmp_path):
    """bench/memory70b.py's default-flag runs: `run` (each device in a cgroup: the bound is its
    limit, no 80-layer extrapolation) and `generate` (no limit: judged against 1.0 GB only)."""
    from tpi.bench.other_benchmarks import memory_70b_section

    docs = Path(__file__).resolve().parents[2] / "docs"
    files = [docs / "benchmarks-memory-70b-defaults.json", docs / "benchmarks-memory-70b-generate.json"]
    if not all(f.is_file() for f in files):
        pytest.skip("no default-flag 70B results in docs/")
    for f in files:
        (tmp_path / f.name).write_text(f.read_text())
    text = memory_70b_section([], tmp_path)
    for f in files:
        data = json.loads(f.read_text())   # one run, or runs by variant (before / after)
        runs = [data] if "devices" in data else [v for v in data.values() if isinstance(v, dict) and "devices" in v]
        assert runs
        for run in runs:
            devs = run["devices"]
            within = sum(d["peak_rss"] <= 1e9 for d in devs)
            assert f"{within} of {len(devs)} at most 1.0 GB" in text
    assert "no limit (every block resident)" in text
    assert "with the 80-layer KV cache" not in text
