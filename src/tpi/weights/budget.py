"""Memory sizes and budgets: reading sizes and what a device may give to its layer weights
and KV cache under the process's memory limit (the scheduler's budget)."""
from __future__ import annotations

import re

MiB = 1 << 20


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold what the scheduler needs."""


# --- sizes and budgets -----------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """'800MB' -> 800_000_000, '1.5GiB' -> 1_610_612_736, '4096' -> 4096 bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read the size {text!r}: use e.g. 800MB, 1.5GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    if abs(n) >= 100 * MiB:
        return f"{n / MiB:.0f} MiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def default_device_budget(devices_in_process: int = 1, limit: int | None = None,
                          rss: int | None = None) -> int | None:
    """Memory one device may give to layer weights and its KV cache under the process's
    memory limit (tpi.host.memory_budget: the limit minus what the process holds and a
    headroom), shared by the devices of this process. None when there is no limit."""
    from tpi.host import headroom_bytes, memory_budget, memory_limit_bytes, rss_bytes

    limit = memory_limit_bytes() if limit is None else limit
    if limit is None:
        return None
    rss = (rss_bytes() or 0) if rss is None else rss
    free = memory_budget(limit, rss)
    if free <= 0:
        raise MemoryBudgetError(
            f"the memory limit {format_size(limit)} leaves nothing for layer weights: the process "
            f"already holds {format_size(rss)} and needs {format_size(headroom_bytes(limit))} of headroom")
    return free // devices_in_process
