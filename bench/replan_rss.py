"""The master's resident memory across re-plans (SmolLM2, float32, real Redis, loopback).

Starts redis-server, a master with `--registry` and two workers, then repeats: start a
third worker and send a request (the master admits it: re-plan), kill that worker and send
a request (re-plan over the survivors). Prints the master's VmRSS / VmHWM after each step.

    python bench/replan_rss.py --cycles 3
Not a test: the figures go to docs/appliance.md. Reuses the cluster helpers of tests/.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]

import redis  # noqa: E402
from procs import free_port  # noqa: E402
from test_registry_cluster import chat, plan_devices, start_redis, start_registry_master, start_worker  # noqa: E402
from tpi.cluster.registry import Keys  # noqa: E402


def memory_mib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=3)
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="replan-rss-"))
    rport = free_port()
    redis_proc = start_redis(rport)
    registry = f"redis://127.0.0.1:{rport}/0"
    workers = [start_worker(registry, logs, f"w{i}") for i in (1, 2)]
    master = start_registry_master(registry, logs).wait_ready()
    client = redis.Redis(port=rport)
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; logs in {logs}")
    print("| step | devices in plan | master VmRSS MiB | VmHWM MiB |\n|---|---|---|---|")

    def row(step: str) -> None:
        chat(master, False, 8)
        rss, hwm = memory_mib(master.proc.pid)
        print(f"| {step} | {len(plan_devices(master))} | {rss} | {hwm} |", flush=True)

    try:
        row("first request")
        for cycle in range(args.cycles):
            extra = start_worker(registry, logs, f"x{cycle}")
            while client.get(Keys().worker(f"x{cycle}")) is None:
                time.sleep(0.2)                # registered (and refused "full"): admitted at the next request
            time.sleep(2)                      # the master's membership has seen it
            row(f"cycle {cycle + 1}: worker admitted")
            extra.kill()
            extra.wait()
            time.sleep(5)
            row(f"cycle {cycle + 1}: worker lost")
    finally:
        master.stop()
        for w in workers:
            w.kill()
        redis_proc.kill()


if __name__ == "__main__":
    main()
