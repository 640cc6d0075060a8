"""Star all-reduce: two hops whatever the device count.

Workers send their partial (Partial) to the hub. On the hub's event loop the partials are
decoded as they arrive (one reader task per worker, so concurrently); when the last one is
in, the loop adds them to the master's own in float32 in rank order, rounds the sum once to
the wire dtype and sends it back (Reduced) straight away: the master's engine thread is
woken in parallel, off the workers' critical path. Every device ends with identical values.
"""
from __future__ import annotations

import torch

from tpi.comm.base import CommError, Communicator
from tpi.comm.conn import Conn
from tpi.comm.rounds import Aborted, Round, Tracker
from tpi.protocol import Header, Partial, ProtocolError, Reduced, decode, encode


class HubRound(Round):
    def __init__(self, step: int, group: dict[int, int], conns: list[Conn],
                 acc: torch.Tensor, wire: torch.dtype, max_bytes: int):
        super().__init__(step, group)                 # group: conn id -> rank of every worker
        self.conns, self.acc = conns, acc             # acc: float32, the input's shape
        self.wire, self.max_bytes = wire, max_bytes
        self.parts: dict[int, torch.Tensor] = {}      # rank -> partial (wire dtype)

    def missing(self) -> list[int]:
        return sorted(set(self.watch.values()) - set(self.parts))


class StarReducer(Tracker):
    """The hub's loop side."""

    def __init__(self) -> None:
        super().__init__()
        self._early: dict[int, tuple[int, Header, bytes]] = {}  # conn -> partial ahead of us

    def start(self, rnd: HubRound) -> None:
        if not self.begin(rnd):
            return
        for conn in rnd.watch:
            early = self._early.get(conn)
            if early is not None and early[1].step <= rnd.step:
                del self._early[conn]
                if early[1].step == rnd.step:
                    self._add(rnd, *early)
        self._maybe_finish(rnd)

    def on_partial(self, conn: int, rank: int, h: Header, data: bytes) -> None:
        rnd = self.round
        if rnd is not None and conn in rnd.watch and h.step == rnd.step:
            self._add(rnd, rank, h, data)
            self._maybe_finish(rnd)
        elif rnd is None or h.step > rnd.step:
            self._early[conn] = (rank, h, data)       # a worker ahead of the master
        # else: a step that already failed; dropped

    def on_lost(self, conn: int, rank: int, reason: str) -> None:
        self._early.pop(conn, None)
        super().on_lost(conn, rank, reason)

    def _add(self, rnd: HubRound, rank: int, h: Header, data: bytes) -> None:
        if rnd.done or rank in rnd.parts:
            return
        try:
            rnd.parts[rank] = decode(data, header=h, expect=Partial, step=rnd.step,
                                     shape=tuple(rnd.acc.shape), dtype=rnd.wire).msg.tensor
        except ProtocolError as e:
            self.fail(rnd, CommError(f"rank {rank}: {e}"))

    def _maybe_finish(self, rnd: HubRound) -> None:
        if rnd.done or len(rnd.parts) < len(rnd.watch):
            return
        for rank in sorted(rnd.parts):                # fixed order: reproducible sums
            rnd.acc += rnd.parts[rank]
        out = rnd.acc.to(rnd.wire)                    # rounded once, sent, returned here
        try:
            data = encode(Reduced(out), step=rnd.step, max_bytes=rnd.max_bytes)
        except ProtocolError as e:
            return self.fail(rnd, CommError(str(e)))
        for c in rnd.conns:
            c.put(data)
        self.succeed(rnd, out)


class HubStarCommunicator(Communicator):
    """Rank 0's side, over a StarHub."""

    rank = 0

    def __init__(self, hub):
        self._hub = hub
        self.world_size = hub.world_size

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        hub = self._hub
        step, group, conns = hub._star_begin()
        acc = tensor.detach().to(torch.float32, copy=True)  # same shape as tensor
        wire = torch.float32 if exact else hub.wire_dtype
        rnd = HubRound(step, group, conns, acc, wire, hub.max_bytes)
        hub._io.call(hub._star.start, rnd)
        try:
            out = rnd.wait(hub.timeout, "the workers' partials")
        except CommError as e:
            hub._io.call(hub._star.cancel, rnd)
            if "timed out" in str(e):
                e = CommError(f"{e}: rank(s) {rnd.missing()} did not answer")
            hub._collective_failed(step, e)
            raise CommError(f"star all_reduce on the master: {e}") from e
        return out.to(tensor.dtype)


class ClientRound(Round):
    def __init__(self, step: int, hub_conn: int, shape: tuple[int, ...], wire: torch.dtype):
        super().__init__(step, {hub_conn: 0})
        self.shape, self.wire = shape, wire


class StarWaiter(Tracker):
    """A worker's loop side: send the partial, wait for the sum."""

    def start(self, rnd: ClientRound, conn: Conn, data: bytes) -> None:
        if self.begin(rnd):
            conn.put(data)

    def on_reduced(self, h: Header, data: bytes) -> None:
        rnd = self.round
        if rnd is None or h.step != rnd.step:
            return                                    # stale: that round already gave up
        try:
            out = decode(data, header=h, expect=Reduced, step=rnd.step, shape=rnd.shape,
                         dtype=rnd.wire).msg.tensor
        except ProtocolError as e:
            return self.fail(rnd, CommError(f"from the hub: {e}"))
        self.succeed(rnd, out)


class ClientStarCommunicator(Communicator):
    """A worker's side, over a StarClient."""

    def __init__(self, client):
        self._client = client
        self.rank, self.world_size = client.rank, client.world_size

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        c = self._client
        step = c._collective_begin()
        wire = torch.float32 if exact else c.wire_dtype
        try:
            data = encode(Partial(tensor), step=step, wire_dtype=wire, max_bytes=c.max_bytes)
        except ProtocolError as e:
            raise CommError(str(e)) from e
        rnd = ClientRound(step, c._conn.id, tuple(tensor.shape), wire)
        c._io.call(c._star.start, rnd, c._conn, data)
        try:
            out = rnd.wait(c.timeout, "the sum from the master")
        except CommError as e:
            c._io.call(c._star.cancel, rnd)
            c._collective_failed(step, e)
            if isinstance(e, Aborted):
                raise
            raise CommError(f"star all_reduce on rank {self.rank}: {e}") from e
        return out.to(tensor.dtype)
