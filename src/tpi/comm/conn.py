"""One WebSocket connection with its send queue (event-loop side).

Everything a process sends goes through `Conn.put`, which stamps the emulated delivery time
(link.py) and returns at once; a per-connection task writes the frames in order. The
connection id is unique in the process, so a frame or loss report from an old connection
of a rank is never mistaken for one from its replacement. Once the handshake has set
`session`, every frame sent is sealed and every frame received is checked (session.py).

Until then a peer may send only small frames (HANDSHAKE_MAX_BYTES: a Hello is ~200 bytes):
`authenticated()` raises the limit to the group's frame limit.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections import deque

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from tpi.comm.link import Link
from tpi.comm.session import TAG_BYTES, Session

log = logging.getLogger("tpi.comm")
_ids = itertools.count(1)
_TIMER_SLACK = 0.0005
HANDSHAKE_MAX_BYTES = 4096  # the largest frame accepted before the peer is authenticated


def set_nodelay(ws) -> None:
    """Disable Nagle: a 2 KB partial must not wait for an ACK (asyncio sets it too)."""
    sock = ws.transport.get_extra_info("socket") if ws.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def describe(ws) -> str:
    addr = getattr(ws, "remote_address", None)
    return f"{addr[0]}:{addr[1]}" if addr else "?"


class Conn:
    """A websocket plus its ordered, optionally link-delayed send queue. Loop thread only."""

    def __init__(self, ws, link: Link | None):
        self.id = next(_ids)
        self.ws = ws
        self.peer = describe(ws)
        self._link = link
        self.session: Session | None = None
        self._queue: deque[tuple[float, bytes | asyncio.Future]] = deque()
        self._wake = asyncio.Event()
        self._last_at = 0.0
        self._loop = asyncio.get_running_loop()
        # websockets >= 13 asyncio internals used by the fast path; checked once here.
        self._direct = all(hasattr(ws, a) for a in ("protocol", "send_data", "paused",
                                                     "send_in_progress"))
        set_nodelay(ws)
        self._pump_task = self._loop.create_task(self._pump())

    def authenticated(self, session: Session, max_bytes: int) -> None:
        """The handshake succeeded: seal and check every later frame with `session`, and
        accept frames up to `max_bytes`."""
        self.session = session
        self.ws.protocol.max_message_size = max_bytes + TAG_BYTES

    async def recv(self) -> bytes | memoryview:
        """The next frame, its tag checked once the session is set (ProtocolError if not);
        ConnectionClosed when the connection ends."""
        data = await self.ws.recv()
        return data if self.session is None else self.session.open(data)

    def put(self, data: bytes) -> None:
        """Queue one frame; it leaves at its emulated delivery time (now if no link)."""
        if self.session is not None:
            data = self.session.seal(data)
        if self._link is None and not self._queue and self._write_now(data):
            return
        at = 0.0
        if self._link is not None:
            at = max(self._link.schedule(len(data), self._loop.time()), self._last_at)
            self._last_at = at
        self._queue.append((at, data))
        self._wake.set()

    def _write_now(self, data: bytes) -> bool:
        """Fast path: hand the frame to the transport without a task switch, as
        `websockets` does inside `send()`, when nothing is queued, the connection is open and
        the transport is not applying back-pressure. One event-loop iteration less per frame
        (decode steps do ~60 all-reduces per token). Falls back to the queue otherwise."""
        ws = self.ws
        if not self._direct or ws.protocol.state is not State.OPEN or ws.paused \
                or ws.send_in_progress is not None:
            return False
        ws.protocol.send_binary(data)
        ws.send_data()
        return True

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to the socket."""
        if self._pump_task.done():
            return
        fut = self._loop.create_future()
        self._queue.append((0.0, fut))
        self._wake.set()
        await fut

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Flush, then close the websocket (reason truncated to the 123-byte limit)."""
        try:
            await asyncio.wait_for(self.flush(), 2.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):  # 3.10: not TimeoutError
            pass
        reason = reason.encode()[:120].decode(errors="ignore")
        try:
            await self.ws.close(code, reason)
        finally:
            self._pump_task.cancel()

    async def _pump(self) -> None:
        q, ws = self._queue, self.ws
        try:
            while True:
                if not q:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                at, item = q.popleft()
                if isinstance(item, asyncio.Future):
                    if not item.done():
                        item.set_result(None)
                    continue
                if at:
                    # epoll rounds timeouts up to the next millisecond (+0.5 ms on average);
                    # aiming half a millisecond early makes the emulated delay unbiased.
                    delay = at - self._loop.time() - _TIMER_SLACK
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send(item)
        except ConnectionClosed:
            pass
        finally:
            for _, item in q:
                if isinstance(item, asyncio.Future) and not item.done():
                    item.set_result(None)
            q.clear()
