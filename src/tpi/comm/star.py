"""Star all-reduce: two hops whatever the device count, on the data plane (dataplane.py).

Each worker sends its partial (Partial, in the wire dtype) to the master and blocks on its
data connection for the sum. The master's engine thread reads the partials in rank order
straight out of each connection's receive buffer (no copy), adds them to its own in a
float32 accumulator, rounds the sum once to the wire dtype and sends it back (Reduced). No
event loop and no thread hand-off on the way; every device ends with identical values
(base.reduce_sum states the arithmetic, which the in-process group shares). Frames are
built in preallocated buffers (`Frames`): a decode step sends the same shapes every time.

A lost connection, a timeout or a bad frame fails the collective: the master then aborts
the epoch on every worker (an Abort frame on each data connection), steps.py.
"""
from __future__ import annotations

import time

import torch

from tpi.comm.base import CommError, Communicator
from tpi.comm.dataplane import TimedOut
from tpi.comm.rounds import Aborted
from tpi.protocol import (Abort, Message, Partial, ProtocolError, Reduced, decode,
                          frame_header, read_header, set_step)

_CACHED_SHAPES = 16  # frame buffers kept per communicator (decode reuses a few shapes)


class Frame:
    """One preallocated frame of `kind` carrying a tensor of `shape` and `dtype`: `buf` is
    header and payload, `tensor` a view on the payload, `header` what a received frame of
    this kind, shape, dtype and step must start with."""

    def __init__(self, kind: type[Message], shape: tuple[int, ...], dtype: torch.dtype):
        head = frame_header(kind, dtype, shape, 0)
        self.hlen, numel = len(head), torch.Size(shape).numel()
        self.buf = bytearray(self.hlen + numel * dtype.itemsize)
        self.buf[:self.hlen] = head
        self.view = memoryview(self.buf)
        self.header = self.view[:self.hlen]
        self.tensor = (torch.frombuffer(self.buf, dtype=dtype, offset=self.hlen, count=numel)
                       if numel else torch.empty(0, dtype=dtype)).view(shape)  # (*shape)
        self.shape, self.dtype, self.numel = shape, dtype, numel

    def stamp(self, step: int) -> memoryview:
        set_step(self.buf, step)
        return self.view

    def payload_of(self, frame: memoryview) -> torch.Tensor:
        """The tensor of a received frame that matched `header` (a view, no copy)."""
        if not self.numel:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(frame, dtype=self.dtype, offset=self.hlen,
                                count=self.numel).view(self.shape)


class Frames:
    """The frames one communicator sends and expects, by (kind, shape, dtype)."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, Frame] = {}

    def get(self, kind: type[Message], shape: tuple[int, ...], dtype: torch.dtype) -> Frame:
        key = (kind, shape, dtype)
        f = self._by_key.get(key)
        if f is None:
            if len(self._by_key) >= _CACHED_SHAPES:
                self._by_key.clear()
            f = self._by_key[key] = Frame(kind, shape, dtype)
        return f


def _payload(frame: memoryview, expect: Frame, step: int, max_bytes: int
             ) -> torch.Tensor | None:
    """The tensor of `frame` if it is `expect`'s kind, shape and dtype for `step` (the fast
    path: one comparison against the expected header); None for a frame of an earlier step
    (one a device gave up on); Aborted if the master aborted this epoch; else ProtocolError."""
    if frame[:expect.hlen] == expect.header and len(frame) == len(expect.buf):
        return expect.payload_of(frame)
    h = read_header(frame, max_bytes)
    if h.kind == Abort.KIND:
        msg = decode(frame, header=h, max_bytes=max_bytes).msg
        if h.step >> 32 >= step >> 32:
            raise Aborted(h.step >> 32, msg.reason)
        return None
    if h.step < step and h.kind in (Partial.KIND, Reduced.KIND):
        return None
    raise ProtocolError(f"kind {h.kind} step {h.step >> 32}:{h.step & 0xFFFFFFFF} shape "
                        f"{list(h.shape)} dtype code {h.dtype} on the data connection; "
                        f"expected {list(expect.shape)} {expect.dtype} at step "
                        f"{step >> 32}:{step & 0xFFFFFFFF}")


class HubStarCommunicator(Communicator):
    """Rank 0's side, over a StarHub's public endpoint (`begin_collective`,
    `collective_failed`, `expel`)."""

    rank = 0

    def __init__(self, hub):
        self._hub = hub
        self.world_size = hub.world_size
        self._frames = Frames()
        self._acc = torch.empty(0)                    # float32, grows to the largest input

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        hub = self._hub
        step, links = hub.begin_collective()          # links: rank -> DataSocket
        wire = torch.float32 if exact else hub.wire_dtype
        shape, deadline = tuple(tensor.shape), time.monotonic() + hub.timeout
        expect = self._frames.get(Partial, shape, wire)
        out = self._frames.get(Reduced, shape, wire)
        set_step(expect.buf, step)
        if self._acc.numel() < out.numel:
            self._acc = torch.empty(out.numel, dtype=torch.float32)
        acc = self._acc[:out.numel].view(shape)       # (*shape) float32
        acc.copy_(tensor.detach())
        rank = 0
        try:
            for rank in sorted(links):                # fixed order: reproducible sums
                part = None
                while part is None:
                    part = _payload(links[rank].recv(deadline), expect, step, hub.max_bytes)
                acc += part
            out.tensor.copy_(acc)                     # rounded once to the wire dtype
            frame = out.stamp(step)
            for rank in sorted(links):
                links[rank].send(frame)
        except (CommError, ProtocolError) as e:
            if isinstance(e, TimedOut):
                why = f"timed out after {hub.timeout:g}s: rank(s) [{rank}] did not answer"
            elif isinstance(e, ProtocolError):
                why = f"rank {rank} sent a bad frame: {e}"
            else:
                why = f"rank {rank} lost: {e}"
            err = CommError(f"star all_reduce on the master: {why}")
            hub.collective_failed(step, err)          # every worker learns first, then
            if not isinstance(e, TimedOut):           # the broken one is disconnected
                hub.expel(rank, f"data connection: {why}")
            raise err from e
        return out.tensor.to(tensor.dtype, copy=True)


class ClientStarCommunicator(Communicator):
    """A worker's side, over a StarClient's public endpoint."""

    def __init__(self, client):
        self._client = client
        self.rank, self.world_size = client.rank, client.world_size
        self._frames = Frames()

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        c = self._client
        step, links = c.begin_collective()            # links: {0: DataSocket}
        wire = torch.float32 if exact else c.wire_dtype
        shape, deadline = tuple(tensor.shape), time.monotonic() + c.timeout
        part = self._frames.get(Partial, shape, wire)
        expect = self._frames.get(Reduced, shape, wire)
        set_step(expect.buf, step)
        try:
            part.tensor.copy_(tensor.detach())        # in the wire dtype
            links[0].send(part.stamp(step))
            got = None
            while got is None:
                got = _payload(links[0].recv(deadline), expect, step, c.max_bytes)
            return got.to(tensor.dtype, copy=True)
        except Aborted as e:
            c.collective_failed(step, e)
            raise
        except (CommError, ProtocolError) as e:
            if not isinstance(e, TimedOut):           # the master is gone or broken
                c.leave(f"data connection: {e}")
            c.collective_failed(step, e)
            raise CommError(f"star all_reduce on rank {self.rank}: {e}") from e
