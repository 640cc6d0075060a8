"""The two WebSocket links a device keeps for the ring (event-loop side).

Each device has an outgoing link to its successor (rank + 1) % N and an incoming one from
its predecessor. Workers listen for their predecessor on their own port (announced to the
hub with PeerInfo); the master's predecessor (rank N-1) connects to the hub's port. The
master starts a build with RingSetup(generation, peers); a newer generation replaces the
old links, e.g. after a worker was replaced. Ring links authenticate with the same
join-token handshake as joins, and every frame on them carries its session tag
(session.py). Frames that arrive go to `on_chunk`, losses to `on_lost`
(the RingReducer in ring.py).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import websockets
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from tpi.comm import auth, handshake
from tpi.comm.base import CommError
from tpi.comm.conn import HANDSHAKE_MAX_BYTES, Conn
from tpi.comm.link import Link
from tpi.protocol import VERSION, Header, Hello, ProtocolError, RingChunk, read_header

log = logging.getLogger("tpi.comm")


class RingLinks:
    """This device's ring links (event-loop side). `current` is read by the engine."""

    def __init__(self, rank: int, world_size: int, token: str,
                 on_chunk: Callable[[int, Header, bytes], None],
                 on_lost: Callable[[int, int, str], None],
                 link: Link | None, max_bytes: int, timeout: float, client_ssl=None):
        self.rank, self.world_size = rank, world_size
        self._token, self._link = token, link
        self._on_chunk, self._on_lost = on_chunk, on_lost
        self._max_bytes, self._timeout, self._client_ssl = max_bytes, timeout, client_ssl
        self.generation = 0
        self.current: tuple[int, Conn, Conn] | None = None  # (generation, in, out)
        self._incoming: dict[int, Conn] = {}
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Condition()

    @property
    def pred(self) -> int:
        return (self.rank - 1) % self.world_size

    @property
    def succ(self) -> int:
        return (self.rank + 1) % self.world_size

    def healthy(self) -> bool:
        """Both current links open (a hint, read from any thread)."""
        cur = self.current
        if self.world_size == 1:
            return True
        return cur is not None and all(c.ws.state is State.OPEN for c in cur[1:])

    async def accept(self, conn: Conn, hello: Hello) -> None:
        """Serve an authenticated incoming ring link until it closes."""
        if hello.want_rank != self.pred or hello.generation < self.generation:
            await handshake.refuse(conn, "protocol", f"ring link from rank {hello.want_rank} "
                                   f"generation {hello.generation}; rank {self.rank} expects "
                                   f"rank {self.pred}, generation >= {self.generation}")
            return
        old = self._incoming.get(hello.generation)
        self._incoming[hello.generation] = conn
        async with self._changed:
            self._changed.notify_all()
        if old is not None:
            await old.close(1000, "replaced")
        reason = "closed"
        try:
            while True:
                data = await conn.recv()
                h = read_header(data, self._max_bytes)
                if h.kind != RingChunk.KIND:
                    raise ProtocolError(f"kind {h.kind} on a ring link (only RingChunk)")
                self._on_chunk(conn.id, h, data)
        except ConnectionClosed as e:
            reason = f"ring link closed ({e})"
        except ProtocolError as e:
            reason = f"bad frame on ring link: {e}"
            log.warning("rank %d: %s", self.rank, reason)
            await handshake.refuse(conn, "protocol", str(e))
        finally:
            self._on_lost(conn.id, self.pred, reason)

    async def _connect(self, url: str, generation: int) -> Conn:
        ssl = self._client_ssl if url.startswith("wss:") else None
        ws = await websockets.connect(url, compression=None, max_size=HANDSHAKE_MAX_BYTES,
                                      open_timeout=self._timeout, proxy=None, ssl=ssl)
        conn = Conn(ws, self._link)
        hello = Hello(version=VERSION, nonce=auth.new_nonce(), name=f"ring-{self.rank}",
                      purpose="ring", want_rank=self.rank, generation=generation)
        try:
            await handshake.join(conn, self._token, hello, self._timeout, self._max_bytes)
        except BaseException:
            await conn.close(1000, "ring setup failed")
            raise
        task = asyncio.get_running_loop().create_task(self._watch_out(conn))
        self._tasks.add(task)                          # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _watch_out(self, conn: Conn) -> None:
        """Nothing should arrive on the outgoing link; report when it closes."""
        reason = "closed"
        try:
            try:
                await conn.recv()
            except ProtocolError:
                pass
            reason = "successor sent data on the outgoing ring link"
            await handshake.refuse(conn, "protocol", reason)
        except ConnectionClosed as e:
            reason = f"ring link closed ({e})"
        finally:
            self._on_lost(conn.id, self.succ, reason)

    async def build(self, generation: int, succ_url: str) -> None:
        """Connect to the successor, wait for the predecessor, switch to the new links."""
        self.generation = max(self.generation, generation)
        out = await self._connect(succ_url, generation)
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: generation in self._incoming),
                    self._timeout)
        except asyncio.TimeoutError:
            await out.close(1000, "ring setup timed out")
            raise CommError(f"rank {self.rank}: predecessor rank {self.pred} did not connect "
                            f"within {self._timeout:g}s") from None
        old = self.current
        self.current = (generation, self._incoming[generation], out)
        for g in [g for g in self._incoming if g < generation]:
            await self._incoming.pop(g).close(1000, "ring rebuilt")
        if old is not None:
            await old[2].close(1000, "ring rebuilt")

    async def close(self) -> None:
        for conn in list(self._incoming.values()):
            await conn.close(1001, "going away")
        if self.current is not None:
            await self.current[2].close(1001, "going away")
