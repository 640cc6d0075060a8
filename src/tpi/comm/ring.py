"""Ring all-reduce: reduce-scatter then all-gather, 2(N-1) hops of 1/N of the tensor each.

The tensor is flattened and split into N chunks (sizes differ by at most one element).
Hop p < N-1 (reduce-scatter): send the chunk last updated, receive the predecessor's and
add it. After N-1 hops this device holds the complete sum of chunk (rank + 1) % N, rounds
it once to the wire dtype and the all-gather hops pass the complete chunks around, so every
device ends with identical values. The whole exchange runs on the event loop (RingReducer),
one hop per arriving frame; the engine thread is woken once, with the result.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from tpi.comm.base import CommError, Communicator
from tpi.comm.conn import Conn
from tpi.comm.ringlinks import RingLinks
from tpi.comm.rounds import Aborted, Round, Tracker
from tpi.protocol import (Header, ProtocolError, RingChunk, RingSetup, SetupDone, decode,
                          encode)

log = logging.getLogger("tpi.comm")
MAX_STASH = 1024  # frames of later steps kept; more means a neighbour is badly out of step


class RingRound(Round):
    def __init__(self, step: int, watch: dict[int, int], shape: tuple[int, ...],
                 acc: torch.Tensor, rank: int, n: int, in_conn: int, out_conn: Conn,
                 wire: torch.dtype, max_bytes: int):
        super().__init__(step, watch)
        self.shape, self.acc = shape, acc             # acc: (numel,) float32
        self.chunks = torch.tensor_split(acc, n)      # n views into acc
        self.rank, self.n, self.in_conn, self.out_conn = rank, n, in_conn, out_conn
        self.wire, self.max_bytes = wire, max_bytes
        self.part = 0                                 # the hop expected next


class RingReducer(Tracker):
    """A device's loop side of the ring."""

    def __init__(self) -> None:
        super().__init__()
        self._stash: list[tuple[int, Header, bytes]] = []

    def start(self, rnd: RingRound) -> None:
        if not self.begin(rnd):
            return
        self._send(rnd, 0, rnd.rank)
        stash, self._stash = self._stash, []
        for conn, h, data in stash:
            if h.step > rnd.step:
                self._stash.append((conn, h, data))
            elif h.step == rnd.step and not rnd.done:
                self.on_chunk(conn, h, data)

    def on_chunk(self, conn: int, h: Header, data: bytes) -> None:
        rnd = self.round
        if rnd is not None and conn == rnd.in_conn and h.step == rnd.step:
            if h.part != rnd.part:
                return self.fail(rnd, CommError(f"ring hop {h.part} arrived, expected "
                                                f"{rnd.part}"))
            self._hop(rnd, h, data)
        elif rnd is None or h.step > rnd.step:
            if len(self._stash) >= MAX_STASH:
                log.warning("ring: %d early frames, dropping them", len(self._stash))
                self._stash.clear()
            self._stash.append((conn, h, data))      # the predecessor is a step ahead
        # else: a step that already failed; dropped

    def _hop(self, rnd: RingRound, h: Header, data: bytes) -> None:
        n, r, p, chunks = rnd.n, rnd.rank, rnd.part, rnd.chunks
        idx = (r - p - 1) % n if p < n - 1 else (r - (p - n + 1)) % n
        try:
            got = decode(data, header=h, expect=RingChunk, step=rnd.step,
                         shape=tuple(chunks[idx].shape), dtype=rnd.wire).msg.tensor
        except ProtocolError as e:
            return self.fail(rnd, CommError(f"ring hop {p} from rank {(r - 1) % n}: {e}"))
        if p < n - 1:                                 # reduce-scatter
            chunks[idx].add_(got)
            if p == n - 2:                            # chunk (r + 1) % n is complete
                chunks[idx].copy_(chunks[idx].to(rnd.wire))
        else:                                         # all-gather
            chunks[idx].copy_(got)
        rnd.part = p + 1
        if rnd.part == 2 * (n - 1):
            return self.succeed(rnd, rnd.acc.view(rnd.shape))
        self._send(rnd, rnd.part, idx)                # pass on the chunk just updated

    def _send(self, rnd: RingRound, part: int, idx: int) -> None:
        try:
            data = encode(RingChunk(rnd.chunks[idx]), step=rnd.step, part=part,
                          wire_dtype=rnd.wire, max_bytes=rnd.max_bytes)
        except ProtocolError as e:
            return self.fail(rnd, CommError(str(e)))
        rnd.out_conn.put(data)


class Ring:
    """One device's ring: its links (ringlinks.py), its loop-side reducer, and the members it
    was last built for. Lives beside an endpoint (StarHub or StarClient), which it reaches
    through their public methods only."""

    def __init__(self, endpoint, token: str, link, client_ssl=None):
        self.reducer = RingReducer()
        self.links = RingLinks(endpoint.rank, endpoint.world_size, token,
                               self.reducer.on_chunk, self.reducer.on_lost, link,
                               endpoint.max_bytes, endpoint.timeout, client_ssl)
        self.built_for: dict[int, int] | None = None  # rank -> conn id the ring was built for
        self.ready = threading.Event()
        self._generation = 0

    def stale(self, members: dict[int, int]) -> bool:
        return members != self.built_for or not self.links.healthy()

    def watch(self, endpoint, step: int) -> dict[int, int]:
        """conn id -> rank of everything this collective depends on; CommError (and the
        epoch aborted) if the ring is not built for the current members."""
        members = endpoint.members()
        if endpoint.rank == 0:
            ok, why = members == self.built_for, ("the ring was not built for the current "
                                                  "workers; call hub.communicator() again "
                                                  "after workers join or leave")
        else:
            ok = self.ready.wait(endpoint.timeout)
            why = f"the master did not build the ring within {endpoint.timeout:g}s"
        if not ok:
            err = CommError(why)
            endpoint.collective_failed(step, err)
            raise err
        return {conn: rank for rank, conn in members.items()}

    def build_from_hub(self, hub, timeout: float) -> None:
        """Master: wait for every worker's ring port, send RingSetup, build this end, wait
        for every worker's SetupDone."""
        deadline = time.monotonic() + timeout
        hub.wait_for_workers(timeout=timeout)
        full = lambda ws: len(ws) == hub.world_size - 1 and all(w.ring_url for w in ws.values())
        workers = hub.wait_until(full, max(0.0, deadline - time.monotonic()),
                                 "workers did not announce their ring ports in time")
        members = hub.members()
        self._generation += 1
        gen = self._generation
        hub.send_setup(RingSetup(generation=gen,
                                 peers={str(r): w.ring_url for r, w in workers.items()}))
        if hub.world_size > 1:
            hub.run_on_loop(self.links.build(gen, workers[1].ring_url),
                            max(0.1, deadline - time.monotonic()))
        pending = set(workers)
        while pending:
            rank, done = hub.setup_reply(max(0.0, deadline - time.monotonic()))
            if done.generation != gen:
                continue
            if not done.ok:
                raise CommError(f"ring setup failed on rank {rank}: {done.detail}")
            pending.discard(rank)
        self.built_for = members
        log.info("ring generation %d ready over %d devices", gen, hub.world_size)

    async def build_on_worker(self, setup: RingSetup, hub_url: str) -> SetupDone:
        """A worker's answer to RingSetup (on its event loop)."""
        succ = (self.links.rank + 1) % self.links.world_size
        url = hub_url if succ == 0 else setup.peers.get(str(succ), "")
        try:
            await self.links.build(setup.generation, url)
        except Exception as e:  # noqa: BLE001 - reported to the master
            log.warning("rank %d: ring setup failed: %s", self.links.rank, e)
            return SetupDone(generation=setup.generation, ok=False, detail=str(e))
        self.ready.set()
        return SetupDone(generation=setup.generation)


class RingCommunicator(Communicator):
    """Ring all-reduce for a hub (rank 0) or a client, over their public endpoint
    (`begin_collective`, `members`, `collective_failed`, `call_on_loop`) and their Ring."""

    def __init__(self, endpoint, ring: Ring):
        self._ep, self._ring = endpoint, ring
        self.rank, self.world_size = endpoint.rank, endpoint.world_size

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        ep, ring, n = self._ep, self._ring, self.world_size
        step, _ = ep.begin_collective()
        watch = ring.watch(ep, step)                  # conn id -> rank
        if n == 1:
            return tensor.detach().clone()
        _, inn, out = ring.links.current
        links = ring.links
        watch = {**watch, inn.id: links.pred, out.id: links.succ}
        acc = tensor.detach().to(torch.float32, copy=True).reshape(-1)  # (numel,)
        rnd = RingRound(step, watch, tuple(tensor.shape), acc, self.rank, n, inn.id, out,
                        torch.float32 if exact else ep.wire_dtype, ep.max_bytes)
        ep.call_on_loop(ring.reducer.start, rnd)
        try:
            res = rnd.wait(ep.timeout, "the ring")
        except CommError as e:
            ep.call_on_loop(ring.reducer.cancel, rnd)
            ep.collective_failed(step, e)
            if isinstance(e, Aborted):
                raise
            raise CommError(f"ring all_reduce on rank {self.rank} (hop {rnd.part}): {e}") \
                from e
        return res.to(tensor.dtype)
