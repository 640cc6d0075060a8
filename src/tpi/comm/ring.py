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

import torch

from tpi.comm.base import CommError, Communicator
from tpi.comm.conn import Conn
from tpi.comm.rounds import Aborted, Round, Tracker
from tpi.protocol import Header, ProtocolError, RingChunk, decode, encode

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


class RingCommunicator(Communicator):
    """Ring all-reduce for a hub (rank 0) or a client; `endpoint` supplies the plumbing:
    rank, world_size, timeout, wire_dtype, max_bytes, _io, _ring_links, _ring_reducer,
    _ring_begin() and _collective_failed()."""

    def __init__(self, endpoint):
        self._ep = endpoint
        self.rank, self.world_size = endpoint.rank, endpoint.world_size

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        ep, n = self._ep, self.world_size
        step, watch = ep._ring_begin()                # watch: conn id -> rank
        if n == 1:
            return tensor.detach().clone()
        _, inn, out = ep._ring_links.current
        links = ep._ring_links
        watch = {**watch, inn.id: links.pred, out.id: links.succ}
        acc = tensor.detach().to(torch.float32, copy=True).reshape(-1)  # (numel,)
        rnd = RingRound(step, watch, tuple(tensor.shape), acc, self.rank, n, inn.id, out,
                        torch.float32 if exact else ep.wire_dtype, ep.max_bytes)
        ep._io.call(ep._ring_reducer.start, rnd)
        try:
            res = rnd.wait(ep.timeout, "the ring")
        except CommError as e:
            ep._io.call(ep._ring_reducer.cancel, rnd)
            ep._collective_failed(step, e)
            if isinstance(e, Aborted):
                raise
            raise CommError(f"ring all_reduce on rank {self.rank} (hop {rnd.part}): {e}") \
                from e
        return res.to(tensor.dtype)
