"""Running one system of the memory benchmark: TPI's devices, or a Hugging Face baseline, as
children of bench/memory.py (its `device` and `hf` commands), each in a cgroup (v1) of its
own with its memory limit, the page cache dropped before (tpi.bench.cgroup)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tpi.bench.cgroup import Cgroup
from tpi.host import drop_page_cache

ENTRY = Path(__file__).with_name("memory.py")  # the command line whose `device` and `hf` run the children


def cold_start() -> None:
    """Every run starts from an empty page cache: refuse to measure a warm one."""
    if not drop_page_cache():
        raise SystemExit("could not drop the page cache (needs root): see /work/shared/BENCHMARKING.md")


def child_env(threads: str | None = None) -> dict:
    """A child's environment: `threads` (default: $BENCH_THREADS, else 1) for torch (BENCH_THREADS)
    and OpenMP alike."""
    threads = threads or os.environ.get("BENCH_THREADS", "1")
    return dict(os.environ, OMP_NUM_THREADS=threads, BENCH_THREADS=threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGKILL)
            codes.append(-9)
    return codes


def proc_status(pid: int) -> dict:
    """VmHWM and VmRSS of a running process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL after 30 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def memory_of(cg: Cgroup) -> dict:
    return {"cgroup_peak": cg.peak(), "oom_killed": cg.oom_kills() > 0}


def run_tpi(name: str, store: Path, world: int, opts: dict, limits: list[int | None], tokens: int,
            workdir: Path) -> dict:
    """`world` device processes, rank 0 driving generation; each one's figures and its cgroup's."""
    port = free_port()
    procs, cgs = [], []
    cold_start()
    for rank in range(world):
        cg = Cgroup(f"tpi-bench-{rank}", limits[rank])
        cgs.append(cg)
        argv = [sys.executable, str(ENTRY), "device", "--rank", str(rank), "--world", str(world), "--port", str(port),
                "--store", str(store), "--opts", json.dumps(opts), "--tokens", str(tokens),
                "--result", str(workdir / f"{name}-{rank}.json")]
        procs.append(cg.spawn(argv, workdir / f"{name}-{rank}.log", child_env()))
        if rank == 0:
            time.sleep(1.0)  # the TCP store is hosted by rank 0
    codes = wait_all(procs, 1800)
    out = {"system": name, "kind": "tpi", "opts": opts, "limits": limits, "exit_codes": codes, "devices": []}
    for rank, cg in enumerate(cgs):
        dev = {"rank": rank, **memory_of(cg)}
        res = workdir / f"{name}-{rank}.json"
        if res.is_file():
            dev.update(json.loads(res.read_text()))
            res.unlink()
        out["devices"].append(dev)
        cg.remove()
    d0 = out["devices"][0]
    out.update(ttft_s=d0.get("ttft_s"), token_latency_s=d0.get("token_latency_s"))
    return out


def run_hf(name: str, model: Path, limit: int | None, offload: bool, max_memory: int, tokens: int, workdir: Path) -> dict:
    """Transformers in one process: the whole model, or Accelerate disk offload within `max_memory`."""
    cold_start()
    cg = Cgroup("tpi-bench-hf", limit)
    argv = [sys.executable, str(ENTRY), "hf", "--model", str(model), "--tokens", str(tokens),
            "--result", str(workdir / f"{name}.json")]
    if offload:
        argv += ["--offload", "--max-memory", str(max_memory), "--offload-folder", str(workdir / "offload")]
    proc = cg.spawn(argv, workdir / f"{name}.log", child_env(os.environ.get("BENCH_HF_THREADS", "2")))
    code = wait_all([proc], 3600)[0]
    out = {"system": name, "kind": "hf", "limits": [limit], "max_memory": max_memory if offload else None,
           "exit_codes": [code], "devices": [{"rank": 0, **memory_of(cg)}]}
    res = workdir / f"{name}.json"
    if res.is_file():
        r = json.loads(res.read_text())
        out["devices"][0].update(r)
        out.update(ttft_s=r["ttft_s"], token_latency_s=r["token_latency_s"])
        res.unlink()
    cg.remove()
    return out
