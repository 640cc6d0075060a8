"""StarClient: a worker's end of the group. It needs only the hub's URL and the join token.

    client = StarClient.connect("ws://master:29500", token="s3cret")
    comm = client.communicator()         # at once; ring / gloo wait for the master's setup
    while True:
        msg = client.recv_control()      # ForwardStep, Shutdown, ...
        ...
        y = comm.all_reduce(partial)
        client.send(Reply(seq=msg.seq))

If the hub connection drops, every call raises CommError; make a new client to rejoin.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from urllib.parse import urlsplit

import torch
import websockets
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tpi.comm import auth, handshake
from tpi.comm.base import CommError, Communicator
from tpi.comm.conn import Conn
from tpi.comm.gloo import GlooCommunicator, LazyGlooCommunicator, make_store
from tpi.comm.link import Link, LinkSpec
from tpi.comm.loop import LoopThread
from tpi.comm.ring import RingCommunicator, RingReducer
from tpi.comm.ringlinks import RingLinks
from tpi.comm.star import ClientStarCommunicator, StarWaiter
from tpi.comm.steps import Steps
from tpi.protocol import (DEFAULT_MAX_BYTES, MESSAGE_TYPES, VERSION, Abort, Error, GlooSetup,
                          Hello, Message, PeerInfo, Ping, Pong, ProtocolError, Reduced, RingChunk,
                          RingSetup, SetupDone, decode, dtype_from_name, encode, read_header)

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
        process sends. ssl_context: tls.client_context(...) for wss://. ring_host /
        ring_advertise: where this worker listens for its ring predecessor (ring mode;
        advertised by default as the local address of the hub connection)."""
        auth.join_mac(token, "")  # rejects an empty token early
        self.url, self.timeout, self.max_bytes = url, timeout, max_bytes
        self.link = LinkSpec.parse(link) if isinstance(link, str) else link
        self._token, self._name, self._want = token, name, want_rank
        self._handshake_timeout, self._ssl = handshake_timeout, ssl_context
        self._ring_host, self._ring_advertise = ring_host, ring_advertise
        self._link = Link(self.link) if self.link else None
        self._star = StarWaiter()             # loop side of the star all-reduce
        self._ring_reducer = RingReducer()    # loop side of the ring all-reduce
        self._control: queue.SimpleQueue = queue.SimpleQueue()
        self._gloo: GlooCommunicator | Exception | None = None
        self._gloo_ready = threading.Event()
        self._ring_links: RingLinks | None = None
        self._ring_server = None
        self._ring_ready = threading.Event()
        self._comm: Communicator | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lost: str | None = None
        self._closed = False
        self._io = LoopThread("tpi-client")
        try:
            self._io.run(self._connect(), handshake_timeout + 5)
        except CommError:
            self._io.stop()
            raise
        except Exception as e:  # refused TCP, not a WebSocket server, TLS failure, timeout
            self._io.stop()
            raise CommError(f"cannot join {url}: {e!r}") from e
        log.info("joined %s as rank %d of %d (%s)", url, self.rank, self.world_size,
                 self.allreduce)

    @classmethod
    def connect(cls, url: str, token: str, **kwargs) -> StarClient:
        """Same as the constructor; reads better at call sites."""
        return cls(url, token, **kwargs)

    # ---- event-loop side ---------------------------------------------------------------

    async def _connect(self):
        ssl = self._ssl if self.url.startswith("wss:") else None
        ws = await websockets.connect(self.url, compression=None, max_size=self.max_bytes,
                                      open_timeout=self._handshake_timeout, proxy=None,
                                      ssl=ssl, close_timeout=2)
        conn = Conn(ws, self._link)
        hello = Hello(version=VERSION, nonce=auth.new_nonce(), name=self._name,
                      purpose="join", want_rank=self._want)
        try:
            welcome = await handshake.join(conn, self._token, hello,
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
            r = self._ring_reducer
            self._ring_links = RingLinks(w.rank, w.world_size, self._token, r.on_chunk,
                                         r.on_lost, self._link, self.max_bytes, self.timeout,
                                         self._ssl)
            self._ring_server = await serve(self._handle_ring, self._ring_host, 0,
                                            compression=None, max_size=self.max_bytes,
                                            close_timeout=2)
            port = self._ring_server.sockets[0].getsockname()[1]
            host = self._ring_advertise or ws.local_address[0]
            host = f"[{host}]" if ":" in host else host
            conn.put(encode(PeerInfo(ring_url=f"ws://{host}:{port}")))
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return welcome

    async def _handle_ring(self, ws) -> None:
        conn = Conn(ws, self._link)
        try:
            hello = await handshake.accept(conn, self._token, self._handshake_timeout,
                                           self.max_bytes)
        except (handshake.JoinRefused, ConnectionClosed) as e:
            log.warning("rank %d refused a ring link from %s: %s", self.rank, conn.peer, e)
            return
        if hello.purpose != "ring":
            await handshake.refuse(conn, "protocol", "this is a ring port; join at the master")
            return
        conn.put(encode(handshake.welcome(self._token, hello, self.rank, self.world_size,
                                          self.allreduce, str(self.wire_dtype)[6:])))
        await self._ring_links.accept(conn, hello)

    async def _read(self) -> None:
        conn, reason = self._conn, "closed"
        try:
            while True:
                data = await conn.ws.recv()
                try:
                    h = read_header(data, self.max_bytes)
                    cls = MESSAGE_TYPES[h.kind]
                    if cls.ORIGIN == "worker" or cls.CHANNEL == "handshake" or cls is RingChunk:
                        raise ProtocolError(f"{cls.__name__} is not accepted from the hub")
                    if cls is Reduced:
                        self._star.on_reduced(h, data)
                        continue
                    msg = decode(data, header=h, max_bytes=self.max_bytes).msg
                except ProtocolError as e:
                    reason = f"hub sent a bad frame: {e}"
                    log.error("rank %d: %s", self.rank, reason)
                    await handshake.refuse(conn, "protocol", str(e))
                    return
                if isinstance(msg, Ping):             # answered here, not by the engine thread
                    conn.put(encode(Pong(nonce=msg.nonce)))
                elif isinstance(msg, Abort):
                    self._star.on_abort(h.step >> 32, msg.reason)
                    self._ring_reducer.on_abort(h.step >> 32, msg.reason)
                elif isinstance(msg, RingSetup):
                    task = asyncio.get_running_loop().create_task(self._build_ring(msg))
                    self._tasks.add(task)             # keep a reference until it is done
                    task.add_done_callback(self._tasks.discard)
                elif isinstance(msg, GlooSetup) and not self._gloo_ready.is_set():
                    threading.Thread(target=self._join_gloo, args=(msg,), daemon=True,
                                     name="tpi-gloo-join").start()
                elif isinstance(msg, Error):
                    reason = f"hub reported {msg.code}: {msg.message}"
                    log.error("rank %d: %s", self.rank, reason)
                else:
                    self._control.put((h.step, msg))
        except ConnectionClosed as e:
            reason = f"connection to the hub closed ({e})" if reason == "closed" else reason
        finally:
            self._lost = reason
            self._star.on_lost(conn.id, 0, reason)
            self._ring_reducer.on_lost(conn.id, 0, reason)
            self._control.put(_LOST)

    async def _build_ring(self, msg: RingSetup) -> None:
        succ = (self.rank + 1) % self.world_size
        url = self.url if succ == 0 else msg.peers.get(str(succ), "")
        try:
            if self._ring_links is None:
                raise CommError(f"RingSetup, but this group runs {self.allreduce}")
            await self._ring_links.build(msg.generation, url)
            done = SetupDone(generation=msg.generation)
        except Exception as e:  # noqa: BLE001 - reported to the master
            log.warning("rank %d: ring setup failed: %s", self.rank, e)
            done = SetupDone(generation=msg.generation, ok=False, detail=str(e))
        self._conn.put(encode(done))
        if done.ok:
            self._ring_ready.set()

    async def _shutdown(self) -> None:
        if self._ring_links is not None:
            await self._ring_links.close()
        if self._ring_server is not None:
            self._ring_server.close()
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
        self._send(encode(msg, max_bytes=self.max_bytes))

    def communicator(self, timeout: float = 60.0) -> Communicator:
        """This worker's Communicator, at once. Ring: an all_reduce waits (up to the client's
        `timeout`) for the master to build the ring. Gloo: the first all_reduce joins the
        process group, waiting up to `timeout` for the master's hub.communicator()."""
        if self._comm is not None:
            return self._comm
        if self.allreduce == "star":
            self._comm = ClientStarCommunicator(self)
        elif self.allreduce == "ring":
            self._comm = RingCommunicator(self)       # the first all_reduce waits for the ring
        else:
            self._comm = LazyGlooCommunicator(self.rank, self.world_size,
                                              lambda: self._gloo_joined(timeout))
        return self._comm

    def _join_gloo(self, setup: GlooSetup) -> None:
        """Join the gloo group as soon as the master sets it up, whatever the engine thread
        is doing (one helper thread, once): init_process_group blocks until all ranks join."""
        try:
            host = setup.host or urlsplit(self.url).hostname
            store = make_store(host, setup.port, self.world_size, False, setup.timeout)
            self._gloo = GlooCommunicator(self.rank, self.world_size, store, setup.timeout,
                                          self.wire_dtype)
        except Exception as e:  # noqa: BLE001 - handed to the first all_reduce
            self._gloo = CommError(f"joining the gloo group: {e}")
        self._gloo_ready.set()

    def _gloo_joined(self, timeout: float) -> GlooCommunicator:
        if not self._gloo_ready.wait(timeout):
            raise CommError(f"the master did not set up gloo within {timeout:g}s")
        if isinstance(self._gloo, Exception):
            raise self._gloo
        return self._gloo

    def close(self) -> None:
        """Leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._comm is not None:
            self._comm.close()
        if isinstance(self._gloo, GlooCommunicator):
            self._gloo.close()
        try:
            self._io.run(self._shutdown(), 5)
        except Exception as e:  # noqa: BLE001 - best effort on shutdown
            log.debug("client shutdown: %s", e)
        self._io.stop()

    def __enter__(self) -> StarClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing for the communicators -------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._lost is not None or self._closed:
            raise CommError(f"lost the master: {self._lost or 'client closed'}")
        self._io.call(self._conn.put, data)

    def _collective_begin(self) -> int:
        if self._lost is not None or self._closed:
            raise CommError(f"lost the master: {self._lost or 'client closed'}")
        return self._steps.next()

    def _collective_failed(self, step: int, exc: Exception) -> None:
        self._steps.kill(step >> 32, str(exc))

    def _ring_begin(self) -> tuple[int, dict[int, int]]:
        step = self._collective_begin()
        if self._ring_links is None or not self._ring_ready.wait(self.timeout):
            raise CommError(f"the master did not build the ring within {self.timeout:g}s")
        return step, {self._conn.id: 0}
