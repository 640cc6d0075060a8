"""The master's Cluster over WebSockets: rank 0 runs its own shard in this process and is
the all-reduce hub; workers run theirs in other processes (or on other devices).

Each forward broadcasts the hidden states (never token ids) with the KV slots and start
positions; every device then runs all layers and its slice of the output head, meeting at
each all-reduce; the last one merges every device's output-head candidates. A worker's reply
(its time breakdown and memory) is collected lazily, at the next step, so it costs no hop.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict

from tpi.cluster import Cluster
from tpi.comm.base import CommError
from tpi.memory import peak_rss_bytes, rss_bytes
from tpi.model.shard import ShardRunner
from tpi.protocol import Assignment, ForwardStep, Reply
from tpi.timing import Breakdown
from tpi.weights.store import ShardStore

log = logging.getLogger("tpi.master.cluster")


class RemoteCluster(Cluster):
    def __init__(self, hub, store: ShardStore, runner: ShardRunner, options: dict,
                 assign_timeout: float = 120.0, http_url: str | None = None):
        self.hub, self.store, self.runner, self.options = hub, store, runner, options
        self.http_url = http_url  # the master's shard server, for workers without the volume
        self.world_size = store.plan.world_size
        self.assign_timeout = assign_timeout
        self.assigned: dict[int, object] = {}       # rank -> the connection it was assigned on
        self.stats: dict[int, dict] = {}            # rank -> last reply detail
        self.seq = 0
        self._pending: list[int] = []               # ranks whose reply to self.seq is due
        self._lock = threading.Lock()

    # ---- membership ---------------------------------------------------------------------

    def ensure_assigned(self) -> None:
        """Every rank must be connected and hold its shard; (re)assign newcomers."""
        workers = self.hub.workers()
        missing = [r for r in range(1, self.world_size) if r not in workers]
        if missing:
            raise CommError(f"waiting for worker rank(s) {missing} to (re)join")
        for rank, info in workers.items():
            if self.assigned.get(rank) != info.address:
                self._assign(rank, info.address)

    def _assign(self, rank: int, address: str) -> None:
        plan = {"store": str(self.store.root.resolve()), "store_id": self.store.root.name,
                "shards_url": self.http_url, "options": self.options}
        self.hub.send(rank, Assignment(rank=rank, world_size=self.world_size, plan=plan))
        reply = self._next_reply(rank, -1, self.assign_timeout)
        if not reply.ok:
            raise CommError(f"worker rank {rank} could not load its shard: {reply.detail}")
        self.stats[rank] = json.loads(reply.detail or "{}")
        self.assigned[rank] = address
        log.info("rank %d at %s holds its shard", rank, address)

    def _next_reply(self, rank: int, seq: int, timeout: float) -> Reply:
        while True:  # skip replies to steps that already failed
            msg = self.hub.recv(rank, timeout)
            if isinstance(msg, Reply) and msg.seq == seq:
                return msg

    # ---- Cluster ------------------------------------------------------------------------

    def forward(self, x, slots, starts, every_position=False):
        with self._lock:
            self._collect()
            self.ensure_assigned()
            self.seq += 1
            sent = self.hub.broadcast(ForwardStep(seq=self.seq, slots=list(slots), starts=list(starts),
                                                  hidden=x.contiguous(), every_position=every_position))
            out = self.runner.step(x, self.hub.communicator(), slots, starts, every_position)
            self._pending = sent  # only after success: a failed step's replies never come
            return out

    def _collect(self) -> None:
        for rank in self._pending:
            try:
                reply = self._next_reply(rank, self.seq, self.hub.timeout)
            except CommError as e:
                log.warning("no step reply from rank %d: %s", rank, e)
                self.assigned.pop(rank, None)
                continue
            if reply.ok:
                self.stats[rank] = json.loads(reply.detail or "{}")
        self._pending = []

    def breakdowns(self) -> list[Breakdown]:
        with self._lock:
            self._collect()
        out = [self.runner.last]
        for rank in range(1, self.world_size):
            b = self.stats.get(rank, {}).get("breakdown")
            out.append(Breakdown(b["compute_s"], b["comm_s"], b["disk_wait_s"]) if b else Breakdown())
        return out

    def peak_rss(self) -> list[int | None]:
        with self._lock:
            self._collect()
        return [peak_rss_bytes()] + [self.stats.get(r, {}).get("peak_rss_bytes")
                                    for r in range(1, self.world_size)]

    def device_status(self) -> list[dict]:
        own = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
        workers = self.hub.workers()
        out = [{"rank": 0, "name": "master", "connected": True, **own,
                "shard": asdict(self.store.plan.shards[0])}]
        for rank in range(1, self.world_size):
            info = workers.get(rank)
            out.append({"rank": rank, "name": info.name if info else None, "connected": info is not None,
                        "address": info.address if info else None,
                        "rtt_s": info.rtt_s if info else None,
                        "rss_bytes": self.stats.get(rank, {}).get("rss_bytes"),
                        "peak_rss_bytes": self.stats.get(rank, {}).get("peak_rss_bytes"),
                        "shard": asdict(self.store.plan.shards[rank])})
        return out

    def close(self) -> None:
        self.runner.blocks.close()
