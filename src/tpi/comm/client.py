"""StarClient: a worker's end of the group. It needs only the hub's URL and the join token.

    client = StarClient.connect("ws://master:29500", token="s3cret-of-16+-chars")
    comm = client.communicator()         # at once; ring / gloo wait for the master's setup
    while True:
        msg = client.recv_control()      # ForwardStep, Shutdown, ...
        ...
        y = comm.all_reduce(partial)
        client.send(Reply(seq=msg.seq))

Control messages arrive on the WebSocket (sealed frame by frame, session.py), read by this
client's event loop; the star's partial sums travel on the data connection (dataplane.py),
which the engine thread reads and writes itself. If the hub connection drops, every call
raises CommError; make a new client to rejoin.
"""
from __future__ import annotations

import asyncio
import logging
import queue
from urllib.parse import urlsplit

import torch
import websockets
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tpi.comm import auth, dataplane, handshake
from tpi.comm.base import CommError, Communicator
from tpi.comm.conn import HANDSHAKE_MAX_BYTES, Conn
from tpi.comm.dataplane import DataSocket
from tpi.comm.gloo import LazyGlooCommunicator
from tpi.comm.link import Link, LinkSpec
from tpi.comm.loop import LoopThread
from tpi.comm.ring import Ring, RingCommunicator
from tpi.comm.star import ClientStarCommunicator
from tpi.comm.steps import Steps
from tpi.protocol import (DEFAULT_MAX_BYTES, MESSAGE_TYPES, VERSION, Abort, Error, GlooSetup,
                          Hello, Message, PeerInfo, Ping, Pong, ProtocolError, RingSetup,
                          decode, dtype_from_name, encode, read_header)

log = logging.getLogger("tpi.comm.client")
_LOST = object()


class StarClient:
    def __init__(self, url: str, token: str, *, name: str = "", want_rank: int | None = None,
                 timeout: float = 5.0, handshake_timeout: float = 10.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, link: LinkSpec | str | None = None,
                 ssl_context=None, ring_host: str = "0.0.0.0",
                 ring_advertise: str | None = None):
        """Connect to the hub at `url` (ws:// or wss://) and join. Blocks until admitted.

        Raises handshake.JoinRefused (a CommError) with the hub's reason when refused, and
        CommError when the hub cannot be reached or does not speak this protocol.
        timeout: seconds a collective may wait. link: emulate a link on everything this
        process sends. ssl_context: tls.client_context(...) for wss:// (and the data
        connection). ring_host / ring_advertise: where this worker listens for its ring
        predecessor (ring mode; advertised by default as the local address of the hub
        connection)."""
        auth.join_mac(token, "")  # rejects an empty token early
        self.url, self.timeout, self.max_bytes = url, timeout, max_bytes
        self.link = LinkSpec.parse(link) if isinstance(link, str) else link
        self._token, self._name, self._want = token, name, want_rank
        self._handshake_timeout, self._ssl = handshake_timeout, ssl_context
        self._ring_host, self._ring_advertise = ring_host, ring_advertise
        self._link = Link(self.link) if self.link else None
        self._control: queue.SimpleQueue = queue.SimpleQueue()
        self._ring: Ring | None = None
        self._ring_server = None
        self._gloo: LazyGlooCommunicator | None = None
        self._data: DataSocket | None = None
        self._comm: Communicator | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lost: str | None = None
        self._closed = False
        self._io = LoopThread("tpi-client")
        try:
            key, data_port = self._io.run(self._connect(), handshake_timeout + 5)
            if data_port:
                self._data = dataplane.connect(
                    urlsplit(url).hostname, data_port, self.rank, key, handshake_timeout,
                    max_bytes, ssl_context if url.startswith("wss:") else None, self._link,
                    timeout)
        except CommError:
            self.close()
            raise
        except Exception as e:  # refused TCP, not a WebSocket server, TLS failure, timeout
            self.close()
            raise CommError(f"cannot join {url}: {e!r}") from e
        log.info("joined %s as rank %d of %d (%s)", url, self.rank, self.world_size,
                 self.allreduce)

    @classmethod
    def connect(cls, url: str, token: str, **kwargs) -> StarClient:
        """Same as the constructor; reads better at call sites."""
        return cls(url, token, **kwargs)

    # ---- event-loop side ---------------------------------------------------------------

    async def _connect(self) -> tuple[bytes, int]:
        ssl = self._ssl if self.url.startswith("wss:") else None
        ws = await websockets.connect(self.url, compression=None, max_size=HANDSHAKE_MAX_BYTES,
                                      open_timeout=self._handshake_timeout, proxy=None,
                                      ssl=ssl, close_timeout=2)
        conn = Conn(ws, self._link)
        hello = Hello(version=VERSION, nonce=auth.new_nonce(), name=self._name,
                      purpose="join", want_rank=self._want)
        try:
            welcome, key = await handshake.join(conn, self._token, hello,
                                                self._handshake_timeout, self.max_bytes)
        except BaseException:
            await conn.close(1000, "handshake failed")
            raise
        w = welcome.msg
        self._conn = conn
        self.rank, self.world_size, self.allreduce = w.rank, w.world_size, w.allreduce
        self.wire_dtype: torch.dtype = dtype_from_name(w.wire_dtype)
        self._steps = Steps(welcome.step)
        if w.allreduce == "ring":
            self._ring = Ring(self, self._token, self._link, self._ssl)
            self._gate = asyncio.Semaphore(handshake.MAX_HANDSHAKES)
            self._ring_server = await serve(self._handle_ring, self._ring_host, 0,
                                            compression=None, max_size=HANDSHAKE_MAX_BYTES,
                                            close_timeout=2,
                                            open_timeout=self._handshake_timeout)
            port = self._ring_server.sockets[0].getsockname()[1]
            host = self._ring_advertise or ws.local_address[0]
            host = f"[{host}]" if ":" in host else host
            conn.put(encode(PeerInfo(ring_url=f"ws://{host}:{port}")))
        elif w.allreduce == "gloo":
            self._gloo = LazyGlooCommunicator(w.rank, w.world_size, self.url,
                                              self.wire_dtype, 60.0)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return key, w.data_port

    async def _handle_ring(self, ws) -> None:
        conn = Conn(ws, self._link)
        try:
            acc = await handshake.accept(conn, self._token, self._handshake_timeout,
                                         self._gate)
        except (handshake.JoinRefused, ConnectionClosed) as e:
            log.warning("rank %d refused a ring link from %s: %s", self.rank, conn.peer, e)
            return
        if acc.hello.purpose != "ring":
            await handshake.refuse(conn, "protocol", "this is a ring port; join at the master")
            return
        handshake.admit(conn, self._token, acc, self.rank, self.world_size, self.allreduce,
                        str(self.wire_dtype).removeprefix("torch."), self.max_bytes)
        await self._ring.links.accept(conn, acc.hello)

    async def _read(self) -> None:
        conn, reason = self._conn, "closed"
        try:
            while True:
                try:
                    data = await conn.recv()
                    h = read_header(data, self.max_bytes)
                    cls = MESSAGE_TYPES[h.kind]
                    if cls.ORIGIN == "worker" or cls.CHANNEL in ("handshake", "collective") \
                            and cls is not Abort:
                        raise ProtocolError(f"{cls.__name__} is not accepted from the hub")
                    msg = decode(data, header=h, max_bytes=self.max_bytes).msg
                except ProtocolError as e:
                    reason = f"hub sent a bad frame: {e}"
                    log.error("rank %d: %s", self.rank, reason)
                    await handshake.refuse(conn, "protocol", str(e))
                    return
                if isinstance(msg, Ping):             # answered here, not by the engine thread
                    conn.put(encode(Pong(nonce=msg.nonce)))
                elif isinstance(msg, Abort):
                    self._steps.kill(h.step >> 32, msg.reason)
                    if self._ring is not None:
                        self._ring.reducer.on_abort(h.step >> 32, msg.reason)
                elif isinstance(msg, RingSetup) and self._ring is not None:
                    task = asyncio.get_running_loop().create_task(self._build_ring(msg))
                    self._tasks.add(task)             # keep a reference until it is done
                    task.add_done_callback(self._tasks.discard)
                elif isinstance(msg, GlooSetup) and self._gloo is not None:
                    self._gloo.joined(msg)
                elif isinstance(msg, Error):
                    reason = f"hub reported {msg.code}: {msg.message}"
                    log.error("rank %d: %s", self.rank, reason)
                else:
                    self._control.put((h.step, msg))
        except ConnectionClosed as e:
            reason = f"connection to the hub closed ({e})" if reason == "closed" else reason
        finally:
            self._lost = reason
            if self._data is not None:
                self._data.shutdown(f"lost the master: {reason}")
            if self._ring is not None:
                self._ring.reducer.on_lost(conn.id, 0, reason)
            self._control.put(_LOST)

    async def _build_ring(self, msg: RingSetup) -> None:
        self._conn.put(encode(await self._ring.build_on_worker(msg, self.url)))

    async def _shutdown(self) -> None:
        if self._ring is not None:
            await self._ring.links.close()
        if self._ring_server is not None:
            self._ring_server.close()
        if getattr(self, "_conn", None) is not None:
            await self._conn.close(1000, "worker leaving")

    # ---- engine side -------------------------------------------------------------------

    def recv_control(self, timeout: float | None = None) -> Message:
        """The next control message from the master (blocks; None = no timeout).

        Raises TimeoutError if none came in time, CommError if the hub connection is gone."""
        try:
            item = self._control.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no control message within {timeout:g}s") from None
        if item is _LOST:
            self._control.put(_LOST)
            raise CommError(f"lost the master: {self._lost}")
        step, msg = item
        self._steps.adopt(step)
        return msg

    def send(self, msg: Message) -> None:
        """Send a message (e.g. Reply) to the master."""
        if self._lost is not None or self._closed:
            raise CommError(f"lost the master: {self._lost or 'client closed'}")
        self._io.call(self._conn.put, encode(msg, max_bytes=self.max_bytes))

    def communicator(self) -> Communicator:
        """This worker's Communicator, at once. Ring: an all_reduce waits (up to the client's
        `timeout`) for the master to build the ring. Gloo: the first all_reduce joins the
        process group, waiting up to 60 s for the master's hub.communicator()."""
        if self._comm is None:
            if self.allreduce == "star":
                self._comm = ClientStarCommunicator(self)
            elif self.allreduce == "ring":
                self._comm = RingCommunicator(self, self._ring)
            else:
                self._comm = self._gloo
        return self._comm

    def close(self) -> None:
        """Leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._comm is not None:
            self._comm.close()
        if self._data is not None:
            self._data.shutdown("client closed")
        self._io.stop(5, last=self._shutdown())

    def __enter__(self) -> StarClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the endpoint communicators use (star.py, ring.py) ------------------------------

    def begin_collective(self) -> tuple[int, dict[int, DataSocket]]:
        """Claim the next collective step; with it, the data connection to the master."""
        if self._lost is not None or self._closed:
            raise CommError(f"lost the master: {self._lost or 'client closed'}")
        return self._steps.next(), ({0: self._data} if self._data is not None else {})

    def collective_failed(self, step: int, exc: Exception) -> None:
        self._steps.kill(step >> 32, str(exc))

    def leave(self, reason: str) -> None:
        """Give up on a master whose data connection broke: the control connection closes
        too, so recv_control raises and the worker rejoins."""
        if self._data is not None:
            self._data.shutdown(reason)
        self._io.call(lambda: asyncio.ensure_future(self._conn.close(1008, reason[:100])))

    def members(self) -> dict[int, int]:
        return {0: self._conn.id}

    def call_on_loop(self, fn, *args) -> None:
        self._io.call(fn, *args)
