"""Star all-reduce: two hops whatever the device count, on the data plane (dataplane.py).

Each worker sends its partial (Partial, in the wire dtype) to the master and blocks on its
data connection for the sum. The master's engine thread reads the partials in rank order
straight out of each connection's receive buffer (no copy), adds them to its own in a
float32 accumulator, rounds the sum once to the wire dtype and sends it back (Reduced). No
event loop and no thread hand-off on the way; every device ends with identical values
(base.reduce_sum states the arithmetic, which the in-process group shares). Frames are
built in preallocated buffers (`Frames`): a decode step sends the same shapes every time.

The gather (the output head's candidates) is the first hop alone: each worker sends its
tensor (Partial, float32) and returns at once; the master reads them as above and sends
nothing back, so a worker never sees another device's candidates or the chosen token.

A lost connection, a timeout or a bad frame fails the collective: the master then aborts
the epoch on every worker (an Abort frame on each data connection), steps.py.
"""
from __future__ import annotations

import select
import time

import torch

from tpi.comm.base import CommError, Communicator
from tpi.comm.dataplane import WAKE_S, DataSocket, TimedOut
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


class _RankFailed(Exception):
    def __init__(self, rank: int, exc: Exception):
        super().__init__(str(exc))
        self.rank, self.exc = rank, exc


def _gather(links: dict[int, DataSocket], expect: Frame, step: int, max_bytes: int,
            deadline: float) -> dict[int, torch.Tensor]:
    """Each worker's partial for `step`, read from all connections as data arrives (so no
    sender waits for the master to get round to it): rank -> a view into its buffer.
    _RankFailed names the rank whose connection or frame failed; TimedOut the missing."""
    got, waiting, poller, fds = {}, set(links), select.poll(), {}
    for rank, link in links.items():
        try:
            fds[rank] = link.fileno()
            poller.register(fds[rank], select.POLLIN)
        except (OSError, ValueError) as e:             # closed under us: the rank is lost
            raise _RankFailed(rank, CommError(link.lost or str(e))) from None
    by_fd = {fd: rank for rank, fd in fds.items()}
    while True:
        for rank in sorted(waiting):
            try:
                while rank in waiting and links[rank].ready():
                    part = _payload(links[rank].take(), expect, step, max_bytes)
                    if part is not None:
                        got[rank] = part
                        waiting.discard(rank)
                        # by the number registered: the hub's other thread may close the
                        # socket meanwhile (a bad control frame), and then fileno() is -1
                        poller.unregister(fds[rank])
            except (CommError, ProtocolError) as e:
                raise _RankFailed(rank, e) from None
        if not waiting:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimedOut(f"rank(s) {sorted(waiting)} did not answer")
        for fd, _ in poller.poll(min(left, WAKE_S) * 1000):
            try:
                links[by_fd[fd]].read(wait=False)
            except (CommError, ProtocolError) as e:
                raise _RankFailed(by_fd[fd], e) from None


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
        try:
            for rank, part in sorted(_gather(links, expect, step, hub.max_bytes,
                                             deadline).items()):
                acc += part                           # rank order: reproducible sums
            out.tensor.copy_(acc)                     # rounded once to the wire dtype
            frame = out.stamp(step)
            for rank in sorted(links):
                try:
                    links[rank].send(frame)
                except CommError as e:
                    raise _RankFailed(rank, e) from None
        except (TimedOut, _RankFailed) as f:
            raise self._failed(step, f) from f
        return out.tensor.to(tensor.dtype, copy=True)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every worker's float32 tensor, read as it arrives; nothing is sent back."""
        hub = self._hub
        step, links = hub.begin_collective()          # links: rank -> DataSocket
        shape, deadline = tuple(tensor.shape), time.monotonic() + hub.timeout
        expect = self._frames.get(Partial, shape, torch.float32)
        set_step(expect.buf, step)
        out = torch.empty(self.world_size, *shape, dtype=torch.float32)  # (N, *shape)
        out[0] = tensor.detach()
        try:
            for rank, part in _gather(links, expect, step, hub.max_bytes, deadline).items():
                out[rank] = part                      # copied out of the receive buffer
        except (TimedOut, _RankFailed) as f:
            raise self._failed(step, f) from f
        return out

    def _failed(self, step: int, f: Exception) -> CommError:
        """Abort the collective's epoch everywhere, expel a broken rank; the error to raise."""
        hub = self._hub
        if isinstance(f, TimedOut):
            why = f"timed out after {hub.timeout:g}s: {f}"
        elif isinstance(f.exc, ProtocolError):
            why = f"rank {f.rank} sent a bad frame: {f.exc}"
        else:
            why = f"rank {f.rank} lost: {f.exc}"
        err = CommError(f"star collective on the master: {why}")
        hub.collective_failed(step, err)              # every worker learns first, then
        if isinstance(f, _RankFailed):                # the broken one is disconnected
            hub.expel(f.rank, f"data connection: {why}")
        return err


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

    def gather(self, tensor: torch.Tensor) -> None:
        """Send this worker's tensor to the master (float32) and return: no reply comes."""
        c = self._client
        step, links = c.begin_collective()            # links: {0: DataSocket}
        part = self._frames.get(Partial, tuple(tensor.shape), torch.float32)
        try:
            part.tensor.copy_(tensor.detach())
            links[0].send(part.stamp(step))
        except CommError as e:                        # the master is gone
            c.leave(f"data connection: {e}")
            c.collective_failed(step, e)
            raise CommError(f"star gather on rank {self.rank}: {e}") from e
        return None
