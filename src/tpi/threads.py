"""How many threads torch may use on this device.

Several TPI processes on one machine (the loopback transport, containers on one host) must
not each spin a full OpenMP team: idle OpenMP threads busy-wait while their process waits
for an all-reduce, stealing the cores the other devices compute on (measured here: 13 s
instead of 0.6 s per token with 3 processes on 2 cores). So: passive waiting, and no more
threads than the CPU quota of the container (or the share of the machine) allows.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_quota() -> float | None:
    """CPUs allowed by this process's cgroup (v2 cpu.max or v1 CFS quota), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def prefer_passive_wait() -> None:
    """Call before torch is imported: idle OpenMP threads sleep instead of spinning."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure_threads(share_of_machine: int = 1) -> int:
    """Set torch's intra-op threads to what this device may use; returns the number.
    OMP_NUM_THREADS, when set, wins; `share_of_machine` divides the cores among that many
    processes on one machine."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    n = max(1, cores // max(1, share_of_machine))
    torch.set_num_threads(n)
    return n
