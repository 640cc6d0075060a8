"""Facts about the host this process runs on, each read in one place: resident memory, the
memory and CPU limits of its cgroup, the one memory-budget rule, the page cache, and how
torch computes here (threads, matmul kernels) and how the allocator returns large blocks.

The budget rule (`memory_budget`) is shared by the planner (which estimates what a device
will give TPI before anything is loaded) and the runtime (which knows what the process
already holds): budget = limit - held - headroom, where the headroom (max(128 MiB, 10 % of
the limit)) covers activations and transients.

Threads: several TPI processes on one machine (the loopback transport, containers on one
host) must not each spin a full OpenMP team: idle OpenMP threads busy-wait while their
process waits for an all-reduce, stealing the cores the other devices compute on (measured
here: 13 s instead of 0.6 s per token with 3 processes on 2 cores). So: passive waiting, and
no more threads than the CPU quota of the container (or the share of the machine) allows.
A master counts the cluster's processes on each machine from the addresses its workers joined
from (`host_shares`) and gives each its share: with a master and 3 workers on 2 cores, one
thread each (SmolLM2 through the HTTP API: 69 -> 55 ms/token against two threads each).

Kernels: a decode step multiplies one row by each weight matrix. For bfloat16, torch's default
route (oneDNN) costs 40-60 us of set-up per call whatever the size, which for a shard's small
matrices is most of the work (SmolLM2, a quarter of a layer: 576x576 in 70 us against 29 us).
Without oneDNN, torch's bfloat16 matmul accumulates in float32 just the same (equal error,
last-bit differences) and a decode step costs a third less CPU (docs/benchmarks-decode.md).
Float32 matmuls do not go through oneDNN either way.
"""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

MiB = 1 << 20
# What an idle process holds after importing torch and the engine (measured: ~220 MB RSS),
# with slack: the planner's stand-in for the runtime's measured RSS.
IDLE_RUNTIME_BYTES = 320 * MiB
MIN_HEADROOM_BYTES = 128 * MiB
MMAP_THRESHOLD_BYTES = MiB   # allocations this large get pages of their own (fix_mmap_threshold)


# --- this process's memory ---------------------------------------------------------------

def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """VmHWM: the most resident memory this process has held."""
    return _status_bytes("VmHWM")


def rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS.

    glibc keeps freed heap pages (and raises its mmap threshold after large frees, so later
    tensors come from the heap too); without a trim, a process that swaps one set of weights
    for another keeps the RSS of both."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# --- cgroup limits -------------------------------------------------------------------------

def _read_number(path: Path) -> int | None:
    """An integer cgroup file; None for "max", v1's huge "unlimited", or no file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    value = int(text)
    return None if value >= 1 << 60 else value


def memory_limit_bytes() -> int | None:
    """The tightest memory limit on this process's cgroup path (v1 or v2), None if unlimited."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" or "memory" in controllers.split(","):
            roots = (["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] if controllers == ""
                     else ["/sys/fs/cgroup/memory"])
            fname = "memory.max" if controllers == "" else "memory.limit_in_bytes"
            for root in roots:
                p = Path(root + path.rstrip("/"))
                while True:
                    limits.append(_read_number(p / fname))
                    if str(p) == root or p == p.parent:
                        break
                    p = p.parent
    # a container sees its own cgroup at the mount root
    limits += [_read_number(Path("/sys/fs/cgroup/memory.max")),
               _read_number(Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))]
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def cgroup_peak_bytes() -> int | None:
    """Peak usage of this process's cgroup, page cache included."""
    return (_read_number(Path("/sys/fs/cgroup/memory.peak"))
            or _read_number(Path("/sys/fs/cgroup/memory/memory.max_usage_in_bytes")))


def physical_memory_bytes() -> int:
    """MemTotal, or the memory limit when that is lower."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    limit = memory_limit_bytes()
    return min(total, limit) if limit and total else (limit or total)


# --- the one memory-budget rule --------------------------------------------------------------

def headroom_bytes(limit: int) -> int:
    """Kept free for activations and transients."""
    return max(MIN_HEADROOM_BYTES, limit // 10)


def memory_budget(limit: int, held: int) -> int:
    """What TPI may give to layer weights and KV cache under `limit` when the process already
    holds `held` bytes (the runtime passes its RSS; the planner IDLE_RUNTIME_BYTES)."""
    return limit - held - headroom_bytes(limit)


def planned_budget(mem_total_bytes: int) -> int:
    """The planner's budget for a device with this much memory (never negative)."""
    return max(0, memory_budget(mem_total_bytes, IDLE_RUNTIME_BYTES))


# --- page cache ------------------------------------------------------------------------------

def drop_file_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Tell the kernel to drop the cached pages of part of a file (all of it by default)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def drop_page_cache() -> bool:
    """Empty the host's whole page cache (root only), so no run reads another's cached pages."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# --- CPU -------------------------------------------------------------------------------------

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


def usable_cores() -> int:
    """CPUs this process may run on: its affinity, reduced by the cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return min(cores, max(1, math.ceil(quota))) if quota is not None else cores


def prefer_passive_wait() -> None:
    """Call before torch is imported: idle OpenMP threads sleep instead of spinning."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _is_this_machine(ip: str) -> bool:
    import ipaddress
    import socket

    try:
        if ipaddress.ip_address(ip).is_loopback:
            return True
        return ip in socket.gethostbyname_ex(socket.gethostname())[2]
    except (ValueError, OSError):
        return False


def host_shares(worker_addresses: dict[int, str]) -> dict[int, int]:
    """How many of a cluster's processes share each rank's machine: rank -> count, rank 0 (this
    process, the master) included. `worker_addresses`: rank -> the "host:port" it joined from;
    a loopback or local address is this machine, other workers are grouped by IP."""
    from collections import Counter

    hosts = {0: ""}
    for rank, address in worker_addresses.items():
        ip = address.rsplit(":", 1)[0].strip("[]")
        hosts[rank] = "" if _is_this_machine(ip) else ip
    counts = Counter(hosts.values())
    return {rank: counts[h] for rank, h in hosts.items()}


def threads_for(share_of_machine: int) -> int:
    """Torch threads for one of `share_of_machine` processes on this machine."""
    return max(1, usable_cores() // max(1, share_of_machine))


def use_threads(n: int) -> None:
    """Set the calling thread's torch thread count (torch keeps it per thread: a master's
    compute thread is not the one that learns its share) unless OMP_NUM_THREADS decides."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> None:
    """Every allocation of at least `nbytes` on pages of its own, unmapped when freed.

    glibc starts at 128 KiB but raises its threshold to the size of each such block freed (up
    to 32 MiB), so after a few frees, tensors of up to 32 MiB come from the heap, and a heap
    that held them keeps their pages: per-token transients of a few MiB grew a 70B-shaped
    device's heap 40-60 MiB past its weights (docs/benchmarks-memory.md), and a long prompt's
    activations would do the same. A fixed threshold stops the raising. (Not glibc: nothing.)"""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def configure_torch(share_of_machine: int = 1) -> int:
    """How this serving process computes: bfloat16 matmuls off oneDNN (see above), torch's
    intra-op threads set to what this device may use (returns their number), and large
    tensors on pages of their own (`fix_mmap_threshold`). OMP_NUM_THREADS, when set, wins;
    `share_of_machine` divides the cores among that many processes on one machine."""
    import torch

    fix_mmap_threshold()

    torch.backends.mkldnn.enabled = False
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    n = threads_for(share_of_machine)
    torch.set_num_threads(n)
    return n
