"""Memory figures of this process and its container: peak RSS, cgroup limit and peak."""
from __future__ import annotations

from pathlib import Path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """VmHWM: the most resident memory this process has held."""
    return _status_kb("VmHWM")


def rss_bytes() -> int | None:
    return _status_kb("VmRSS")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), None when unlimited."""
    limit = _read_int("/sys/fs/cgroup/memory.max") or _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if limit is not None and limit >= 1 << 60:  # v1 says "unlimited" with a huge number
        return None
    return limit


def cgroup_peak_bytes() -> int | None:
    """Peak usage of this process's cgroup, page cache included."""
    return _read_int("/sys/fs/cgroup/memory.peak") or _read_int("/sys/fs/cgroup/memory/memory.max_usage_in_bytes")


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
