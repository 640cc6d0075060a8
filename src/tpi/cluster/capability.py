"""What one device can do, measured: compute throughput, disk read speed, memory, cores.

A device publishes a `DeviceCapability` in the registry when it joins; the planner
(`tpi.cluster.planner`) turns the capabilities of all devices into a shard plan. Each probe takes
well under a second, so a device can measure itself every time it starts.

  * compute: GFLOP/s of `x @ W` in the compute dtype with the shape of one decode step:
    one token's activations (1, k) times a weight matrix (k, n) bigger than the CPU caches.
    Decoding is this operation, bound by memory bandwidth as much as by arithmetic, so a
    square-matmul figure (several times higher) would overstate tokens per second.
  * disk: MB/s reading a freshly written temporary file after dropping its pages from the
    page cache (fsync + posix_fadvise DONTNEED), in the directory the shards live in. On a
    filesystem that keeps files in memory (tmpfs) this measures memory, which is the truth
    for shards stored there.

torch is imported only inside the compute probe: the dataclass is pure and cheap to import.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tpi.host import drop_file_cache, physical_memory_bytes, planned_budget, usable_cores

MB = 1_000_000
@dataclass(frozen=True)
class DeviceCapability:
    arch: str                 # platform.machine(), e.g. "x86_64", "aarch64"
    cores: int                # usable cores (affinity and cgroup CPU quota)
    mem_total_bytes: int      # physical memory or the container's limit, whichever is lower
    mem_budget_bytes: int     # what this device lets TPI hold: its weights and KV cache
    gflops: float             # decode-shaped matmul throughput in `dtype`
    disk_mbps: float          # read speed of the shard directory, page cache dropped (MB = 1e6 B)
    dtype: str = "float32"    # the compute dtype the probe ran in

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DeviceCapability":
        return cls(
            arch=str(data["arch"]),
            cores=int(data["cores"]),
            mem_total_bytes=int(data["mem_total_bytes"]),
            mem_budget_bytes=int(data["mem_budget_bytes"]),
            gflops=float(data["gflops"]),
            disk_mbps=float(data["disk_mbps"]),
            dtype=str(data.get("dtype", "float32")),
        )


def probe_compute(dtype: str = "float32", seconds: float = 0.2, k: int = 2048, n: int = 4096) -> float:
    """GFLOP/s of (1, k) @ (k, n) in `dtype`, timed for about `seconds` after one warm-up."""
    import torch

    from tpi.dtypes import float_dtype

    dt = float_dtype(dtype)
    # Values do not change a matmul's speed; filling is ten times cheaper than random numbers.
    w = torch.full((k, n), 0.01, dtype=dt)  # (k, n): 32 MiB in float32, beyond the caches
    x = torch.full((1, k), 0.5, dtype=dt)   # (1, k): one token's activations
    with torch.inference_mode():
        x @ w
        iters, start = 0, time.perf_counter()
        while True:
            x @ w
            iters += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * k * n * iters / elapsed / 1e9


def probe_disk(directory: str | Path | None = None, size_mb: int = 16, chunk: int = 1 << 20) -> float:
    """MB/s reading a `size_mb` temporary file in `directory` with its pages dropped first."""
    directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(chunk)  # random, so no filesystem can compress or dedupe it
    fd, name = tempfile.mkstemp(prefix=".tpi-disk-probe-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(size_mb * MB // chunk):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            drop_file_cache(f.fileno())
        total = 0
        start = time.perf_counter()
        with open(name, "rb", buffering=0) as f:
            drop_file_cache(f.fileno())
            while True:
                data = f.read(chunk)
                if not data:
                    break
                total += len(data)
        elapsed = max(time.perf_counter() - start, 1e-6)
    finally:
        os.unlink(name)
    return total / elapsed / MB


def measure(dtype: str = "float32", disk_dir: str | Path | None = None,
            mem_budget_bytes: int | None = None) -> DeviceCapability:
    """Run both probes and read the device's facts. `mem_budget_bytes` defaults to
    `tpi.host.planned_budget` of the device's memory."""
    total = physical_memory_bytes()
    return DeviceCapability(
        arch=platform.machine() or "unknown",
        cores=usable_cores(),
        mem_total_bytes=total,
        mem_budget_bytes=planned_budget(total) if mem_budget_bytes is None else int(mem_budget_bytes),
        gflops=round(probe_compute(dtype), 3),
        disk_mbps=round(probe_disk(disk_dir), 1),
        dtype=dtype,
    )
