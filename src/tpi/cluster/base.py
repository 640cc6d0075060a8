"""A cluster, as the master's generation loop sees it: something that runs every device's
shard of the transformer layers and of the output head on a batch of hidden states and
returns the merged output-head candidates (tpi.model.head.Candidates) to sample from.

`InProcCluster` runs N shards as threads of this process (tests, `--transport inproc`).
The remote cluster (tpi.cluster.remote) implements the same interface over the network.
"""
from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod

import torch

from tpi.comm.inproc import InProcGroup
from tpi.model.head import Candidates
from tpi.model.shard import ShardRunner
from tpi.timing import Breakdown


class Cluster(ABC):
    world_size: int
    transport: str = "none"     # how its devices meet: "inproc" (threads), "ws" (processes over WebSockets)

    @abstractmethod
    def forward(self, x: torch.Tensor, slots: list[int], starts: list[int],
                every_position: bool = False) -> Candidates:
        """x (B, T, H) through all layers and the output head -> the candidates of the last
        position of each row (B rows), or of every position (B*T rows, teacher forcing).
        Rows use KV-cache `slots`; the first new token of row b sits at position starts[b]."""

    def breakdowns(self) -> list[Breakdown]:
        """Per device, the time split of the last forward."""
        return []

    def peak_rss(self) -> list[int | None]:
        """Per device, peak resident memory in bytes where known."""
        return [None] * self.world_size

    def device_status(self) -> list[dict]:
        """Per device, what the cluster knows of it now: {"rank", "memory": {...}, ...}."""
        return [{"rank": r} for r in range(self.world_size)]

    def close(self) -> None:
        pass


class InProcCluster(Cluster):
    transport = "inproc"

    def __init__(self, runners: list[ShardRunner], timeout_s: float = 120.0):
        self.runners = runners
        self.world_size = len(runners)
        self.group = InProcGroup(self.world_size, timeout_s)
        self.comms = [self.group.communicator(r) for r in range(self.world_size)]
        self._jobs: list[queue.Queue] = []
        self._done: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        for rank in range(1, self.world_size):
            q: queue.Queue = queue.Queue()
            self._jobs.append(q)
            t = threading.Thread(target=self._serve, args=(rank, q), daemon=True, name=f"shard-{rank}")
            t.start()
            self._threads.append(t)

    def _serve(self, rank: int, jobs: queue.Queue) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            x, slots, starts, every = job
            try:
                self.runners[rank].step(x, self.comms[rank], slots, starts, every)
                self._done.put(None)
            except BaseException as e:  # report to the caller, unblock the others
                self.group.abort(f"shard {rank} failed: {e}")
                self._done.put(e)

    def forward(self, x, slots, starts, every_position=False):
        self.group.reset()
        for q in self._jobs:
            q.put((x, slots, starts, every_position))
        try:
            out = self.runners[0].step(x, self.comms[0], slots, starts, every_position)
        except BaseException as e:
            self.group.abort(f"shard 0 failed: {e}")
            self._drain()
            raise
        errors = self._drain()
        if errors:
            raise errors[0]
        return out

    def _drain(self) -> list[BaseException]:
        results = [self._done.get() for _ in self._jobs]
        return [e for e in results if e is not None]

    def breakdowns(self):
        return [r.last for r in self.runners]

    def device_status(self):
        return [{"rank": r, "memory": runner.memory_status(), "blocks": runner.blocks.describe(),
                 "link": {"rtt_ms": None, "note": "in-process: no network link" if r else "local"}}
                for r, runner in enumerate(self.runners)]

    def peak_rss(self):
        from tpi.host import peak_rss_bytes

        return [peak_rss_bytes()] * self.world_size  # one process holds every shard

    def close(self):
        for q in self._jobs:
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        for r in self.runners:
            r.blocks.close()
