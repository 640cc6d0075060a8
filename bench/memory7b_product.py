"""The Llama-2-7B shape (8 layers, random weights: `bench/memory.py make-model`) through the
product with DEFAULT flags: `tpi master --model M --devices 4` and three `tpi worker`, the
streamed `/v1/completions` API, greedy over the memory benchmark's prompt:

  1. no limits (the master splits the store here, in a child process, once);
  2. each of the four processes in its own 1 GiB cgroup (v1), the page cache dropped first;
  3. Accelerate disk offload (bfloat16, max_memory 1 GiB) in a 1 GiB cgroup, caches dropped
     (bench/memory_run.py's baseline, the same prompt and token count).

Prints whether 2 started and gave the same tokens as 1, each system's TTFT and token latency
(first token excluded), peaks (VmHWM and the cgroup's, page cache included) and the ratio
Accelerate / TPI. Needs root (cgroups, drop_caches). Not a test.

    python bench/memory7b_product.py --model /var/tmp/tpi-bench/llama2-7b-8l --tokens 16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_model import PROMPT  # noqa: E402
from memory_run import cold_start, free_port, proc_status, run_hf, stop_all  # noqa: E402
from tpi.bench.cgroup import Cgroup  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def run_product(model: Path, devices: int, tokens: int, limit: int | None, workdir: Path) -> dict:
    """Master + workers (default flags), each in its own cgroup when `limit`; one streamed request."""
    token, hub, http = secrets.token_hex(16), free_port(), free_port()
    tag = "limited" if limit else "unlimited"
    if limit:
        cold_start()
    cgs = [Cgroup(f"tpi7b-{tag}-{r}", limit) for r in range(devices)]
    env = dict(os.environ)   # the product picks its own threads
    procs = [cgs[0].spawn([sys.executable, "-m", "tpi_cli", "master", "--model", str(model), "--devices", str(devices),
                           "--listen", f"127.0.0.1:{hub}", "--http", f"127.0.0.1:{http}", "--join-token", token,
                           "--start-timeout", "1800"], workdir / f"{tag}-master.log", env)]
    for r in range(1, devices):
        procs.append(cgs[r].spawn([sys.executable, "-m", "tpi_cli", "worker", "--master", f"ws://127.0.0.1:{hub}",
                                   "--join-token", token, "--name", f"w{r}", "--timeout", "600"],
                                  workdir / f"{tag}-worker-{r}.log", env))
    url, t0 = f"http://127.0.0.1:{http}", time.time()
    result: dict = {"system": f"tpi master + {devices - 1} workers, {'1 GiB cgroup each' if limit else 'no limit'}"}
    try:
        while True:
            if procs[0].poll() is not None:
                log = (workdir / f"{tag}-master.log").read_text(errors="replace")[-1500:]
                result.update(started=False, error=f"master exited {procs[0].returncode}: {log}")
                return result
            try:
                if requests.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() - t0 > 3600:
                result.update(started=False, error="not ready in an hour")
                return result
            time.sleep(1)
        result.update(started=True, ready_s=time.time() - t0)
        before = requests.get(url + "/api/cluster", timeout=60).json()
        times, text, usage = [], "", None
        t1 = time.perf_counter()
        body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=3600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
                    text += chunk["choices"][0]["text"]
        made = (usage or {}).get("completion_tokens") or len(times)
        after = requests.get(url + "/api/cluster", timeout=60).json()
        result.update(text=text, completion_tokens=made, ttft_s=times[0] - t1,
                      token_latency_s=(times[-1] - times[0]) / max(1, made - 1),
                      per_device=where_time_goes(before, after, made),
                      devices=[{"rank": r, **proc_status(p.pid), "cgroup_peak": cgs[r].peak(), "limit": limit,
                                "oom_killed": cgs[r].oom_kills() > 0} for r, p in enumerate(procs)])
        return result
    finally:
        stop_all(procs)
        for cg in cgs:
            cg.remove()


def where_time_goes(before: dict, after: dict, tokens: int) -> list[dict]:
    """Per device, from /api/cluster before and after the request: the last forward's split
    (compute / communication / disk wait, seconds), what its scheduler keeps resident and
    streams, and the bytes it read from disk per generated token during the request."""
    out = []
    for b, a in zip(before["devices"], after["devices"]):
        mem = a.get("memory", {})
        read = (mem.get("bytes_read") or 0) - (b.get("memory", {}).get("bytes_read") or 0)
        out.append({"rank": a["rank"], "last_forward": a.get("last_forward"),
                    "bytes_read_per_token": read / max(1, tokens),
                    **{k: mem.get(k) for k in ("budget_bytes", "kv_cache_bytes", "weights_bytes", "resident_blocks",
                                               "streamed_blocks", "stored_weights_bytes", "rss_bytes")}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--limit", default="1GiB")
    ap.add_argument("--json", required=True)
    ap.add_argument("--workdir", default="/var/tmp/tpi-bench/work7b")
    ap.add_argument("--skip-accelerate", action="store_true")
    args = ap.parse_args()
    from tpi.weights.budget import parse_size

    limit, model, workdir = parse_size(args.limit), Path(args.model), Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()]
    runs = [run_product(model, args.devices, args.tokens, None, workdir)]
    load.append(os.getloadavg())
    runs.append(run_product(model, args.devices, args.tokens, limit, workdir))
    load.append(os.getloadavg())
    if not args.skip_accelerate:
        acc = run_hf("accelerate-offload-1GiB", model, limit, True, limit, args.tokens, workdir)
        acc["system"] = "Accelerate disk offload, bfloat16, max_memory 1 GiB, 1 GiB cgroup"
        runs.append(acc)
        load.append(os.getloadavg())
    free, lim = runs[0], runs[1]
    same = lim.get("started") and lim.get("text") == free.get("text")
    out = {"command": " ".join([Path(sys.executable).name] + sys.argv), "tokens": args.tokens, "limit": limit,
           "loadavg": load, "same_text_as_unlimited": bool(same), "runs": runs}
    if not args.skip_accelerate and lim.get("token_latency_s") and runs[2].get("token_latency_s"):
        out["speedup_vs_accelerate"] = runs[2]["token_latency_s"] / lim["token_latency_s"]
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"load averages (start, after each system): {[tuple(round(x, 1) for x in la) for la in load]}")
    for r in runs:
        peaks = [(round(d.get('VmHWM', d.get('peak_rss', 0)) / MiB), round((d.get('cgroup_peak') or 0) / MiB))
                 for d in r.get("devices", [])]
        print(f"{r['system']}: started {r.get('started', r.get('exit_codes'))}, TTFT {r.get('ttft_s')}, "
              f"{(r.get('token_latency_s') or 0) * 1e3:.0f} ms/token, peaks (VmHWM MiB, cgroup MiB) {peaks}")
    for r in runs:
        for d in r.get("per_device", []):
            f = d.get("last_forward") or {}
            print(f"  {r['system']} rank {d['rank']}: last forward compute {f.get('compute_s', 0) * 1e3:.0f} ms, "
                  f"comm {f.get('comm_s', 0) * 1e3:.0f} ms, disk wait {f.get('disk_wait_s', 0) * 1e3:.0f} ms; "
                  f"read {d['bytes_read_per_token'] / MiB:.0f} MiB/token; blocks resident {d['resident_blocks']}, "
                  f"streamed {d['streamed_blocks']}; budget {(d['budget_bytes'] or 0) / MiB:.0f} MiB "
                  f"(KV {(d['kv_cache_bytes'] or 0) / MiB:.0f} MiB)")
    print(f"same greedy text with and without limits: {bool(same)}")
    if "speedup_vs_accelerate" in out:
        print(f"Accelerate / TPI token latency: {out['speedup_vs_accelerate']:.2f}x")


if __name__ == "__main__":
    main()
