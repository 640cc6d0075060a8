"""A testbed sweep (`tpi bench testbed`): its settings, typed, and their expansion into the
configurations it runs (one RunConfig per point of the grid that makes sense)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from tpi.bench.testbed import PROMPT, RESULTS, RunConfig


@dataclass(frozen=True)
class Sweep:
    runner: str = "docker"                           # docker (containers with limits) or local (processes)
    devices: tuple[int, ...] = (1, 2, 4)
    latencies_ms: tuple[float, ...] = (0.0,)         # one-way link latencies
    bandwidths: tuple[str | None, ...] = (None,)     # e.g. "300mbit"; None: unlimited
    allreduce: tuple[str, ...] = ("star",)
    windows: tuple[int, ...] = (2,)
    budgets: tuple[str | None, ...] = (None,)        # per-device memory budgets; None: derived
    schedulers: tuple[str, ...] = ("on",)            # on / off (off: every block resident)
    dtypes: tuple[str, ...] = ("bfloat16",)
    mem_limits: tuple[str | None, ...] = (None,)     # docker: memory limit per container
    compute_dtype: str | None = None
    master_mem_limit: str | None = None              # docker: the master's limit where mem_limit applies
    cpus: float | None = None                        # docker: CPUs per container
    max_seq: int | None = None
    tokens: int = 16
    prompt: str = PROMPT
    model: str | None = None
    repeats: int = 1                                 # runs per configuration, interleaved
    timeout: float = 900.0                           # seconds per run
    out: Path = RESULTS


def configs(sweep: Sweep) -> list[RunConfig]:
    """Every configuration of the grid, once, in order; one device has no link or all-reduce to
    vary, and a run without the scheduler has no window or budget to vary."""
    out: list[RunConfig] = []
    for n, lat, bw, ar, w, b, dt, sched, lim in itertools.product(
            sweep.devices, sweep.latencies_ms, sweep.bandwidths, sweep.allreduce, sweep.windows,
            sweep.budgets, sweep.dtypes, sweep.schedulers, sweep.mem_limits):
        if n == 1 and (ar != "star" or lat or bw):
            continue
        off = sched == "off"
        if off and (b or w != sweep.windows[0]):
            continue
        config = RunConfig(runner=sweep.runner, devices=n, latency_ms=lat, bandwidth=bw, allreduce=ar, window=w,
                           memory_budget=b, no_scheduler=off, dtype=dt, compute_dtype=sweep.compute_dtype,
                           mem_limit=lim, master_mem_limit=sweep.master_mem_limit if lim else None,
                           cpus=sweep.cpus, tokens=sweep.tokens, prompt=sweep.prompt, model=sweep.model,
                           max_seq=sweep.max_seq)
        if config not in out:
            out.append(config)
    return out
