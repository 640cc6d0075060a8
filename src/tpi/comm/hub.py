"""StarHub: the master's end of the group (rank 0): who is in the group, and the control
messages to and from them.

Workers connect to the hub's WebSocket port, prove the join token (handshake.py) and get
a rank 1..N-1 (in join order, or the one they ask for). That connection carries the
master's control messages (broadcast / send / recv), sealed frame by frame (session.py).
The star all-reduce runs on a second, plain TCP connection per worker (the data plane,
dataplane.py; its port is announced in Welcome); ring and gloo set up their own links
(ring.py, gloo.py) through the public methods at the end of this class. The engine only
sees `communicator()`, a plain `Communicator`.

    hub = StarHub(world_size=4, token="s3cret-of-16+-chars", host="0.0.0.0", port=29500)
    hub.wait_for_workers(timeout=60)
    comm = hub.communicator()            # star: at once; ring / gloo: builds the links
    hub.broadcast(ForwardStep(seq=0, slots=[0], starts=[0], hidden=h))
    y = comm.all_reduce(partial)         # CommError if a worker vanished or stalled

A worker that disconnects, or sends anything that is not the protocol, fails the pending
(or next) all_reduce with CommError at once; its rank becomes free (always: the cleanup is
in a `finally`) and a new worker may take it. After a CommError the collectives of that
epoch stay failed on every device until the master's next broadcast (steps.py).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import torch
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tpi.comm import auth, handshake
from tpi.comm.base import CommError, Communicator
from tpi.comm.conn import HANDSHAKE_MAX_BYTES, Conn
from tpi.comm.dataplane import DataListener, DataSocket
from tpi.comm.gloo import host_group
from tpi.comm.link import Link, LinkSpec
from tpi.comm.loop import LoopThread
from tpi.comm.members import Peer, WorkerInfo, advertised, pick_rank, ping
from tpi.comm.ring import Ring, RingCommunicator
from tpi.comm.star import HubStarCommunicator
from tpi.comm.steps import Steps
from tpi.protocol import (DEFAULT_MAX_BYTES, MESSAGE_TYPES, Abort, Error, Message, PeerInfo,
                          Pong, ProtocolError, SetupDone, decode, dtype_from_name, encode,
                          read_header, step_of)

log = logging.getLogger("tpi.comm.hub")
ALLREDUCE = ("star", "ring", "gloo")
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOST = object()  # end marker in a worker's control queue


class StarHub:
    def __init__(self, world_size: int, token: str, host: str = "127.0.0.1", port: int = 0,
                 *, allreduce: str = "star", wire_dtype: torch.dtype | str = torch.float32,
                 timeout: float = 5.0, handshake_timeout: float = 5.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, link: LinkSpec | str | None = None,
                 ssl_context=None, advertise_host: str | None = None,
                 expected_names: set[str] | None = None, data_port: int | None = None):
        """Listen on host:port (0 = a free port) for `world_size - 1` workers.

        allreduce: "star" (default), "ring" or "gloo" (a benchmark baseline: gloo.py).
        wire_dtype: dtype partial sums travel in (float32, bfloat16, float16); sums are
        computed in float32 (gloo: in the wire dtype). timeout: seconds any collective or
        reply may wait. link: emulate a link on everything this process sends
        ("latency=5ms,bandwidth=300mbit"). ssl_context: serve wss:// (tls.server_context),
        and TLS on the data port. expected_names: admit only workers with these names (the
        devices a plan was made for), so a device that registers while the master re-plans
        cannot take a planned device's rank; None admits anyone. data_port: the star's
        data port (default: port + 1, or a free port when port is 0)."""
        if allreduce not in ALLREDUCE:
            raise ValueError(f"allreduce must be one of {ALLREDUCE}, not {allreduce!r}")
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        auth.join_mac(token, "")  # rejects an empty token early
        self.wire_dtype = dtype_from_name(wire_dtype) if isinstance(wire_dtype, str) \
            else wire_dtype
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {WIRE_DTYPES}")
        self.world_size, self.allreduce, self.timeout = world_size, allreduce, timeout
        self.expected_names = None if expected_names is None else set(expected_names)
        self.handshake_timeout, self.max_bytes = handshake_timeout, max_bytes
        self.link = LinkSpec.parse(link) if isinstance(link, str) else link
        self.rank, self.bind_host = 0, host or "0.0.0.0"
        self._token = token
        self._link = Link(self.link) if self.link else None
        self._cond = threading.Condition()
        self._peers: dict[int, Peer] = {}
        self._steps = Steps()
        self._setup_q: queue.SimpleQueue = queue.SimpleQueue()
        self._comm: Communicator | None = None
        self._ring: Ring | None = None
        self._closed = False
        self._io = LoopThread("tpi-hub")
        self._data: DataListener | None = None
        try:
            self._server = self._io.run(self._serve(host, port, ssl_context), 30)
            self.port: int = self._server.sockets[0].getsockname()[1]
            if allreduce == "star":
                self._data = DataListener(
                    self.bind_host, port + 1 if port and data_port is None else data_port or 0,
                    self._session_of, self._attach, handshake_timeout, max_bytes, ssl_context,
                    self._link, timeout)
        except BaseException:
            self.close()
            raise
        self.data_port = self._data.port if self._data else 0
        self.url = f"{'wss' if ssl_context else 'ws'}://{advertise_host or advertised(host)}" \
                   f":{self.port}"
        log.info("hub listening on %s:%d (%s, world %d, %s)", host, self.port, allreduce,
                 world_size, self.link or "no link emulation")

    # ---- event-loop side ---------------------------------------------------------------

    async def _serve(self, host: str, port: int, ssl_context):
        self._gate = asyncio.Semaphore(handshake.MAX_HANDSHAKES)
        if self.allreduce == "ring":
            self._ring = Ring(self, self._token, self._link)
        return await serve(self._handle, host, port, compression=None,
                           max_size=HANDSHAKE_MAX_BYTES, ssl=ssl_context, close_timeout=2,
                           open_timeout=self.handshake_timeout)

    async def _handle(self, ws) -> None:
        conn = Conn(ws, self._link)
        try:
            acc = await handshake.accept(conn, self._token, self.handshake_timeout, self._gate)
        except (handshake.JoinRefused, ConnectionClosed) as e:
            log.warning("refused %s: %s", conn.peer, e)
            return
        hello, dtype = acc.hello, str(self.wire_dtype).removeprefix("torch.")
        if hello.purpose == "ring" and self._ring is not None:
            handshake.admit(conn, self._token, acc, 0, self.world_size, self.allreduce, dtype,
                            self.max_bytes)
            await self._ring.links.accept(conn, hello)
            return
        if hello.purpose != "join":
            await handshake.refuse(conn, "protocol", f"purpose {hello.purpose!r} is not "
                                                     f"served by this {self.allreduce} master")
            return
        with self._cond:
            rank, refusal = pick_rank(self._peers, self.world_size, self.expected_names,
                                      hello.want_rank, hello.name)
            if rank is not None:
                peer = self._peers[rank] = Peer(rank, hello.name, conn)
                peer.key = handshake.admit(conn, self._token, acc, rank, self.world_size,
                                           self.allreduce, dtype, self.max_bytes,
                                           self.data_port, self._steps.current)
                self._cond.notify_all()
        if rank is None:
            log.warning("refused %s: %s", conn.peer, refusal[1])
            await handshake.refuse(conn, *refusal)
            return
        log.info("rank %d joined from %s%s", rank, conn.peer,
                 f" ({hello.name})" if hello.name else "")
        pinger = asyncio.get_running_loop().create_task(ping(peer))
        reason, bad = "ended", None
        try:
            reason, bad = await self._read(peer)
        finally:                          # whatever happened, the rank is free again
            pinger.cancel()
            self._drop(peer, reason)
        if bad is not None:
            await handshake.refuse(conn, "protocol", bad)
        if not self._closed:
            clean = "received 1000" in reason or "received 1001" in reason
            (log.info if clean else log.warning)("rank %d left: %s", rank, reason)

    def _drop(self, peer: Peer, reason: str) -> None:
        with self._cond:                 # free the rank before the peer can see the close
            if self._peers.get(peer.rank) is peer:
                del self._peers[peer.rank]
            self._cond.notify_all()
        if peer.data is not None:
            peer.data.shutdown(f"rank {peer.rank} lost: {reason}")
        if self._ring is not None:
            self._ring.reducer.on_lost(peer.conn.id, peer.rank, reason)
        peer.control.put(_LOST)

    async def _read(self, peer: Peer) -> tuple[str, str | None]:
        """Route one worker's frames until its connection ends or it breaks the protocol;
        returns why it ended, and what to tell the peer if it broke the protocol."""
        while True:
            try:
                data = await peer.conn.recv()
            except ConnectionClosed as e:
                return f"connection closed ({e})", None
            except ProtocolError as e:
                log.warning("rank %d sent a bad frame, disconnecting it: %s", peer.rank, e)
                return f"protocol error: {e}", str(e)
            try:
                h = read_header(data, self.max_bytes)
                cls = MESSAGE_TYPES[h.kind]
                if cls.ORIGIN == "hub" or cls.CHANNEL in ("handshake", "collective"):
                    raise ProtocolError(f"{cls.__name__} is not accepted from a worker")
                msg = decode(data, header=h, max_bytes=self.max_bytes).msg
            except ProtocolError as e:
                log.warning("rank %d sent a bad frame, disconnecting it: %s", peer.rank, e)
                return f"protocol error: {e}", str(e)
            if isinstance(msg, Pong):
                peer.pong(msg.nonce, asyncio.get_running_loop().time())
            elif isinstance(msg, Error):
                log.warning("rank %d reports %s: %s", peer.rank, msg.code, msg.message)
            elif isinstance(msg, PeerInfo):
                with self._cond:
                    peer.ring_url = msg.ring_url
                    self._cond.notify_all()
            elif isinstance(msg, SetupDone):
                self._setup_q.put((peer.rank, msg))
            else:
                peer.control.put(msg)

    # ---- data connections (DataListener's threads) --------------------------------------

    def _session_of(self, rank: int) -> bytes | None:
        with self._cond:
            peer = self._peers.get(rank)
            return peer.key if peer is not None and peer.data is None else None

    def _attach(self, rank: int, dsock: DataSocket) -> None:
        with self._cond:
            peer = self._peers.get(rank)
            if peer is not None and peer.data is None:
                peer.data = dsock
                self._cond.notify_all()
                return
        dsock.shutdown("rank left or already attached")

    # ---- engine side -------------------------------------------------------------------

    def _ready(self) -> dict[int, Peer]:
        """Peers that can take part in collectives (star: their data connection is up)."""
        return {r: p for r, p in self._peers.items()
                if p.data is not None or self.allreduce != "star"}

    def wait_for_workers(self, n: int | None = None, timeout: float | None = None) -> list[int]:
        """Block until at least `n` (default: all N-1) workers are connected."""
        n = self.world_size - 1 if n is None else n
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._ready()) >= n, timeout):
                raise CommError(f"only {len(self._ready())} of {n} workers joined within "
                                f"{timeout:g}s")
            return sorted(self._ready())

    def workers(self) -> dict[int, WorkerInfo]:
        with self._cond:
            return {r: WorkerInfo(r, p.name, p.conn.peer, p.ring_url, p.rtt_s)
                    for r, p in sorted(self._peers.items())}

    def broadcast(self, msg: Message) -> list[int]:
        """Send `msg` to every connected worker; opens a new collective epoch (steps.py).
        Returns the ranks it was sent to.

        Ring mode: if the workers changed since the ring was built and all are present, the
        ring is rebuilt first, so the steps that follow `msg` find it ready everywhere."""
        if self._ring is not None and self._ring.stale(self.members()):
            with self._cond:
                complete = len(self._peers) == self.world_size - 1
            if complete:
                try:
                    self._ring.build_from_hub(self, 2 * self.timeout)
                except CommError as e:
                    log.warning("ring rebuild before broadcast failed: %s", e)
        with self._cond:
            step = self._steps.new_epoch()
            peers = list(self._peers.values())
        data = encode(msg, step=step, max_bytes=self.max_bytes)
        self._io.call(_put_all, [p.conn for p in peers], data)
        return [p.rank for p in peers]

    def send(self, rank: int, msg: Message) -> None:
        """Send `msg` to one worker (no new epoch)."""
        peer = self._peer(rank)
        self._io.call(peer.conn.put, encode(msg, step=self._steps.current,
                                            max_bytes=self.max_bytes))

    def recv(self, rank: int, timeout: float | None = None) -> Message:
        """The next control message from `rank`. CommError if it left or timed out."""
        peer = self._peer(rank)
        timeout = self.timeout if timeout is None else timeout
        try:
            msg = peer.control.get(timeout=timeout)
        except queue.Empty:
            raise CommError(f"no message from rank {rank} within {timeout:g}s") from None
        if msg is _LOST:
            peer.control.put(_LOST)
            raise CommError(f"rank {rank} disconnected")
        return msg

    def gather(self, timeout: float | None = None,
               ranks: list[int] | None = None) -> dict[int, Message]:
        """One control message from each of `ranks` (default: every connected worker)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        ranks = sorted(self.workers()) if ranks is None else ranks
        return {r: self.recv(r, max(0.0, deadline - time.monotonic())) for r in ranks}

    def communicator(self, timeout: float = 30.0) -> Communicator:
        """Rank 0's Communicator. Star: immediate. Ring: waits for all workers and builds
        the ring if it is not built for the current members (cheap when it is; broadcast()
        also rebuilds it after a worker was replaced). Gloo: waits for all workers and forms
        the process group (once; it cannot be rebuilt)."""
        if self.allreduce == "star":
            self._comm = self._comm or HubStarCommunicator(self)
        elif self.allreduce == "ring":
            if self._ring.stale(self.members()):
                self._ring.build_from_hub(self, timeout)
            self._comm = self._comm or RingCommunicator(self, self._ring)
        elif self._comm is None:
            self._comm = host_group(self, timeout)
        return self._comm

    def close(self) -> None:
        """Disconnect every worker and stop listening. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._comm is not None:
            self._comm.close()
        if self._data is not None:
            self._data.close()
        self._io.stop(10, last=self._shutdown())

    async def _shutdown(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.close()
        with self._cond:
            peers = list(self._peers.values())
        for p in peers:
            await p.conn.close(1001, "master shutting down")
        if self._ring is not None:
            await self._ring.links.close()
        if server is not None:
            await server.wait_closed()

    def __enter__(self) -> StarHub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _peer(self, rank: int) -> Peer:
        with self._cond:
            peer = self._peers.get(rank)
        if peer is None:
            raise CommError(f"rank {rank} is not connected")
        return peer

    # ---- the endpoint communicators and collective setup use (star.py, ring.py, gloo.py) --

    def begin_collective(self) -> tuple[int, dict[int, DataSocket]]:
        """Claim the next collective step; with it, each worker's data connection (star).
        CommError (and the epoch aborted everywhere) if a worker is missing."""
        with self._cond:
            if self._closed:
                raise CommError("hub is closed")
            ready = self._ready()
        step = self._steps.next()
        missing = sorted(set(range(1, self.world_size)) - set(ready))
        if missing:
            err = CommError(f"rank(s) {missing} not connected")
            self.collective_failed(step, err)
            raise err
        return step, {r: p.data for r, p in ready.items() if p.data is not None}

    def collective_failed(self, step: int, exc: Exception) -> None:
        """Mark the epoch dead here and on every worker (Abort on the control and the data
        connections), so nobody waits for it. Engine thread only (it writes the data
        connections)."""
        epoch = step >> 32
        self._steps.kill(epoch, str(exc))
        with self._cond:
            peers = list(self._peers.values())
        data = encode(Abort(reason=str(exc)[:1000]), step=step_of(epoch, 0))
        self._io.call(_put_all, [p.conn for p in peers], data)
        for p in peers:
            if p.data is not None and p.data.lost is None:
                try:
                    p.data.send(data)
                except CommError:
                    pass
        log.warning("collective %d:%d failed, epoch %d aborted: %s", epoch,
                    step & 0xFFFFFFFF, epoch, exc)

    def expel(self, rank: int, reason: str) -> None:
        """Disconnect a worker that broke the protocol or lost its data connection; its
        rank is freed as for any departure (`_handle`'s finally)."""
        with self._cond:
            peer = self._peers.get(rank)
        if peer is None:
            return
        if peer.data is not None:
            peer.data.shutdown(reason)
        self._io.call(lambda: asyncio.ensure_future(
            handshake.refuse(peer.conn, "protocol", reason[:200])))

    def members(self) -> dict[int, int]:
        """rank -> connection id of every connected worker (a new id after a rejoin)."""
        with self._cond:
            return {r: p.conn.id for r, p in self._peers.items()}

    def wait_until(self, pred, timeout: float, what: str) -> dict[int, WorkerInfo]:
        """Block until pred(workers()) holds; CommError(what) after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.workers()):
                if not self._cond.wait(max(0.0, deadline - time.monotonic())) \
                        and time.monotonic() >= deadline:
                    raise CommError(what)
        return self.workers()

    def send_setup(self, msg: Message) -> None:
        """Send a setup message (RingSetup, GlooSetup) to every connected worker."""
        with self._cond:
            conns = [p.conn for p in self._peers.values()]
        self._io.call(_put_all, conns, encode(msg, step=self._steps.current))

    def setup_reply(self, timeout: float) -> tuple[int, SetupDone]:
        """The next SetupDone from any worker, as (rank, message)."""
        try:
            return self._setup_q.get(timeout=timeout)
        except queue.Empty:
            raise CommError("collective setup: a worker did not answer in time") from None

    def call_on_loop(self, fn, *args) -> None:
        self._io.call(fn, *args)

    def run_on_loop(self, coro, timeout: float):
        return self._io.run(coro, timeout)


def _put_all(conns: list[Conn], data: bytes) -> None:
    for c in conns:
        c.put(data)
