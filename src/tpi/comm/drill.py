"""Collective drills: run all-reduces of known inputs on every device and check the sums.

Used by the multi-process tests and bench/allreduce.py; also a quick check of a real
cluster. Rank r's input for repetition i is base_r * (1 + i % 7), with base_r a seeded
standard normal tensor, so the expected sum of every repetition is known to the master.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from tpi.comm.base import CommError, Communicator
from tpi.protocol import CollectiveDrill, DrillReport, Reply, Shutdown, dtype_from_name


def base_input(seed: int, rank: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randn(shape, generator=g).to(dtype)  # (*shape)


def expected_sum(seed: int, world_size: int, rep: int, shape: list[int],
                 dtype: torch.dtype) -> torch.Tensor:
    """The float32 sum over ranks of repetition `rep`'s inputs."""
    total = sum(base_input(seed, r, shape, dtype).float() for r in range(world_size))
    return total * (1 + rep % 7)


def _run(comm: Communicator, d: CollectiveDrill) -> tuple[torch.Tensor, list[float], float]:
    """Returns the last result, wall seconds per call, and process CPU seconds per call
    (all threads: the engine's and the I/O loop's)."""
    dtype = dtype_from_name(d.dtype)
    base = base_input(d.seed, comm.rank, d.shape, dtype)
    inputs = [base * (1 + i % 7) for i in range(min(d.reps, 7))]
    times, out = [], base
    cpu0 = time.process_time()
    for i in range(d.reps):
        t0 = time.perf_counter()
        out = comm.all_reduce(inputs[i % 7], exact=d.exact)
        times.append(time.perf_counter() - t0)
    return out, times, (time.process_time() - cpu0) / max(1, d.reps)


def serve_worker(client, comm: Communicator) -> None:
    """A worker's loop: run drills until Shutdown or the master goes away."""
    while True:
        try:
            msg = client.recv_control()
        except CommError:
            return
        if isinstance(msg, Shutdown):
            return
        if not isinstance(msg, CollectiveDrill):
            client.send(Reply(seq=-1, ok=False, error=f"drill worker: {type(msg).__name__}"))
            continue
        try:
            out, times, cpu = _run(comm, msg)
        except CommError as e:
            client.send(Reply(seq=msg.seq, ok=False, error=str(e)))
            continue
        client.send(DrillReport(seq=msg.seq, median_s=statistics.median(times), cpu_s=cpu, tensor=out))


def worker_main(url: str, token: str, *, threads: int | None = 1, cafile: str | None = None,
                **client_kwargs) -> None:
    """Process entry point: join, build the communicator, serve drills.

    threads: torch intra-op threads (1 keeps several processes on one small machine from
    spinning against each other). cafile: trust this CA / self-signed cert for wss://."""
    from tpi.comm.client import StarClient

    if threads:
        torch.set_num_threads(threads)
    if cafile:
        from tpi.comm.tls import client_context

        client_kwargs["ssl_context"] = client_context(cafile)
    with StarClient.connect(url, token, **client_kwargs) as client:
        serve_worker(client, client.communicator())


@dataclass
class DrillResult:
    master_times: list[float]                 # seconds per all_reduce on rank 0
    master_cpu: float                         # rank 0's process CPU seconds per all_reduce
    master_out: torch.Tensor                  # rank 0's last result
    replies: dict[int, DrillReport]           # each worker's answer (tensor = its last result)
    expected: torch.Tensor                    # float32 sum of the last repetition

    @property
    def median(self) -> float:
        return statistics.median(self.master_times)

    @property
    def worker_cpu(self) -> float:
        """Mean over workers of their process CPU seconds per all_reduce."""
        cpus = [r.cpu_s for r in self.replies.values()]
        return statistics.mean(cpus) if cpus else 0.0

    def max_error(self) -> float:
        """Largest |result - expected| over all devices' last results."""
        outs = [self.master_out] + [r.tensor for r in self.replies.values()]
        return max(float((o.float() - self.expected).abs().max()) for o in outs)


def run_master(hub, comm: Communicator, reps: int, shape: list[int], seed: int = 0,
               dtype: str = "float32", seq: int = 0,
               reply_timeout: float | None = None, exact: bool = False) -> DrillResult:
    """Broadcast a drill, run it on rank 0, collect the workers' replies.

    Raises CommError if rank 0's all_reduce fails (after collecting what replies come)."""
    drill = CollectiveDrill(seq=seq, reps=reps, shape=list(shape), seed=seed, dtype=dtype, exact=exact)
    ranks = hub.broadcast(drill)
    try:
        out, times, cpu = _run(comm, drill)
    except CommError:
        for r in ranks:  # let survivors report; their drills fail too
            try:
                hub.recv(r, timeout=reply_timeout)
            except CommError:
                pass
        raise
    replies = hub.gather(timeout=reply_timeout, ranks=ranks)
    bad = {r: getattr(m, "error", type(m).__name__) for r, m in replies.items() if not isinstance(m, DrillReport)}
    if bad:
        raise CommError(f"drill failed on workers: {bad}")
    exp = expected_sum(seed, hub.world_size, reps - 1, list(shape), dtype_from_name(dtype))
    return DrillResult(times, cpu, out, replies, exp)
