"""Both halves of the remote cluster protocol, master and worker, in one place.

Master (`RemoteCluster`): rank 0 runs its own shard in this process and is the all-reduce
hub; workers run theirs in other processes (or on other devices).
Worker (`serve_assignments`): load the shard an Assignment names, run each ForwardStep,
answer with a Reply, until Shutdown or a lost connection.

Each forward broadcasts the hidden states (never token ids) with the KV slots and start
positions; every device then runs all layers and its slice of the output head, meeting at
each all-reduce; then every device's output-head candidates are gathered to the master
alone (a worker gets nothing back, so it never sees a token id). A worker's reply
(its time breakdown and memory) is collected lazily, at the next step, so it costs no hop.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict

from tpi.cluster.base import Cluster
from tpi.comm.base import CommError
from tpi.host import configure_torch, host_shares, threads_for, use_threads, peak_rss_bytes, release_freed_memory, rss_bytes
from tpi.model.shard import ShardRunner
from tpi.protocol import Assignment, ForwardStep, Reply, Shutdown
from tpi.settings import RuntimeOptions
from tpi.timing import Breakdown
from tpi.weights.store import ShardStore

log = logging.getLogger("tpi.master.cluster")


class RemoteCluster(Cluster):
    transport = "ws"

    def __init__(self, hub, store: ShardStore, runner: ShardRunner, options: RuntimeOptions,
                 assign_timeout: float = 120.0, http_url: str | None = None):
        self.hub, self.store, self.runner, self.options = hub, store, runner, options
        self.http_url = http_url  # the master's shard server, for workers without the volume
        self.world_size = store.plan.world_size
        self.assign_timeout = assign_timeout
        self.assigned: dict[int, object] = {}       # rank -> the connection it was assigned on
        self.stats: dict[int, Reply] = {}           # rank -> its last successful reply
        self.seq = 0
        self._pending: list[int] = []               # ranks whose reply to self.seq is due
        self._threads: int | None = None            # torch threads of this process's share of its machine
        self._lock = threading.Lock()

    # ---- membership ---------------------------------------------------------------------

    def ensure_assigned(self) -> None:
        """Every rank must be connected and hold its shard; (re)assign newcomers."""
        workers = self.hub.workers()
        missing = [r for r in range(1, self.world_size) if r not in workers]
        if missing:
            raise CommError(f"waiting for worker rank(s) {missing} to (re)join")
        if any(self.assigned.get(rank) != info.address for rank, info in workers.items()):
            shares = host_shares({rank: info.address for rank, info in workers.items()})
            self._threads = threads_for(shares[0])
            log.info("computing with %d thread(s): %d of the cluster's processes on this machine",
                     self._threads, shares[0])
            for rank, info in workers.items():
                if self.assigned.get(rank) != info.address:
                    self._assign(rank, info.address, shares[rank])

    def _assign(self, rank: int, address: str, host_share: int) -> None:
        self.hub.send(rank, Assignment(rank=rank, world_size=self.world_size, store=str(self.store.root.resolve()),
                                       store_id=self.store.root.name, options=self.options.to_json(),
                                       shards_url=self.http_url, host_share=host_share))
        reply = self._next_reply(rank, -1, self.assign_timeout)
        if not reply.ok:
            raise CommError(f"worker rank {rank} could not load its shard: {reply.error}")
        self.stats[rank] = reply
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
            if self._threads:
                use_threads(self._threads)  # in the thread that computes
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
                self.stats[rank] = reply
        self._pending = []

    def breakdowns(self) -> list[Breakdown]:
        with self._lock:
            self._collect()
        out = [self.runner.last]
        for rank in range(1, self.world_size):
            reply = self.stats.get(rank)
            out.append(Breakdown.from_reply(reply.breakdown) if reply and reply.breakdown else Breakdown())
        return out

    def peak_rss(self) -> list[int | None]:
        with self._lock:
            self._collect()
        return [peak_rss_bytes()] + [self._memory(r).get("peak_rss_bytes") for r in range(1, self.world_size)]

    def _memory(self, rank: int) -> dict:
        reply = self.stats.get(rank)
        return dict(reply.memory or {}) if reply is not None else {}

    def device_status(self) -> list[dict]:
        workers = self.hub.workers()
        out = [{"rank": 0, "name": "master", "state": "up", "shard": asdict(self.store.plan.shards[0]),
                "memory": {**self.runner.memory_status(), "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()},
                "link": {"rtt_ms": None, "note": "local"}}]
        for rank in range(1, self.world_size):
            info = workers.get(rank)
            rtt = info.rtt_s if info else None
            out.append({"rank": rank, "name": (info.name if info else None) or f"device-{rank}",
                        "address": info.address if info else None, "state": "up" if info else "down",
                        "shard": asdict(self.store.plan.shards[rank]), "memory": self._memory(rank),
                        "link": {"rtt_ms": None if rtt is None else rtt * 1e3,
                                 "note": "Ping/Pong every 5 s through both ends' links" if rtt is not None
                                 else "no round trip measured yet (every 5 s)"}})
        return out

    def close(self) -> None:
        self.runner.blocks.close()


# ---- the worker's half ----------------------------------------------------------------------

def serve_assignments(client, open_store) -> None:
    """Answer the master's control messages until Shutdown or a lost connection (CommError).

    `open_store(assignment)` returns the ShardStore the assignment names (from a shared
    volume, or downloaded: the worker service decides)."""
    from tpi.engine import build_runner

    runner = comm = None
    while True:
        msg = client.recv_control()
        if isinstance(msg, Shutdown):
            log.info("master asked to stop: %s", msg.reason)
            return
        if isinstance(msg, Assignment):
            if runner is not None:  # the old slice and KV cache go before the new ones load
                runner.blocks.close()
                runner = None
                release_freed_memory()
            try:
                log.info("computing with %d thread(s): %d of the cluster's processes on this machine",
                         configure_torch(msg.host_share), msg.host_share)
                store = open_store(msg)
                runner = build_runner(store, msg.rank, RuntimeOptions.from_json(msg.options))
                comm = client.communicator()
            except Exception as e:  # a bad store or options: tell the master, stay up
                log.error("cannot load the assigned shard: %s", e)
                runner = None
                client.send(Reply(seq=-1, ok=False, error=str(e)))
                continue
            client.send(Reply(seq=-1, ok=True, memory=_memory_report(runner)))
            log.info("loaded shard %d of %d from %s", msg.rank, msg.world_size, store.root)
        elif isinstance(msg, ForwardStep):
            if runner is None:
                client.send(Reply(seq=msg.seq, ok=False, error="no shard loaded"))
                continue
            try:
                runner.step(msg.hidden, comm, msg.slots, msg.starts, msg.every_position)
            except CommError as e:
                log.warning("step %d failed: %s", msg.seq, e)
                continue
            except Exception as e:  # a shard error (e.g. a corrupt block): report, stay up
                log.error("step %d failed: %s", msg.seq, e)
                client.send(Reply(seq=msg.seq, ok=False, error=str(e)))
                continue
            client.send(Reply(seq=msg.seq, ok=True, memory=_memory_report(runner), breakdown=runner.last.totals()))


def _memory_report(runner: ShardRunner) -> dict:
    """What a worker tells the master of its memory: the process's and its shard's."""
    return {**runner.memory_status(), "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
