"""StarHub: the master's end of the group (rank 0).

Workers connect to the hub's WebSocket port, prove the join token (handshake.py) and get
a rank 1..N-1 (in join order, or the one they ask for). One connection per worker carries
everything: the all-reduce frames and the master's control messages (broadcast / send /
recv). The engine only sees `communicator()`, a plain `Communicator`.

    hub = StarHub(world_size=4, token="s3cret", host="0.0.0.0", port=29500)
    hub.wait_for_workers(timeout=60)
    comm = hub.communicator()            # star: at once; ring / gloo: builds the links
    hub.broadcast(ForwardStep(seq=0, slots=[0], starts=[0], hidden=h))
    y = comm.all_reduce(partial)         # CommError if a worker vanished or stalled

A worker that disconnects fails the pending (or next) all_reduce with CommError at once;
its rank becomes free and a new worker may take it. After a CommError the collectives of
that epoch stay failed on every device until the master's next broadcast (steps.py).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass

import torch
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tpi.comm import auth, handshake
from tpi.comm.base import CommError, Communicator
from tpi.comm.conn import Conn
from tpi.comm.gloo import GlooCommunicator, make_store
from tpi.comm.link import Link, LinkSpec
from tpi.comm.loop import LoopThread
from tpi.comm.ring import RingCommunicator, RingReducer
from tpi.comm.ringlinks import RingLinks
from tpi.comm.star import HubStarCommunicator, StarReducer
from tpi.comm.steps import Steps
from tpi.protocol import (DEFAULT_MAX_BYTES, MESSAGE_TYPES, Abort, Error, GlooSetup, Message,
                          Partial, PeerInfo, Ping, Pong, ProtocolError, RingSetup, SetupDone,
                          decode, dtype_from_name, encode, read_header, step_of)

log = logging.getLogger("tpi.comm.hub")
ALLREDUCE = ("star", "ring", "gloo")
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOST = object()  # end marker in a worker's control queue
PING_INTERVAL_S = 5.0  # how often the hub measures each worker's round trip


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    name: str
    address: str            # host:port the worker connected from
    ring_url: str | None    # where it accepts its ring predecessor (ring mode)
    rtt_s: float | None = None  # last Ping -> Pong round trip (every 5 s; None before the first),
                                # through both ends' emulated links like every other message


class _Peer:
    def __init__(self, rank: int, name: str, conn: Conn):
        self.rank, self.name, self.conn = rank, name, conn
        self.control: queue.SimpleQueue = queue.SimpleQueue()
        self.ring_url: str | None = None
        self.rtt_s: float | None = None
        self.ping: tuple[int, float] | None = None  # (nonce, loop time sent) awaiting its Pong


def _advertised(host: str) -> str:
    """A host workers can use in `hub.url` (pass advertise_host to choose it)."""
    if host in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class StarHub:
    def __init__(self, world_size: int, token: str, host: str = "127.0.0.1", port: int = 0,
                 *, allreduce: str = "star", wire_dtype: torch.dtype | str = torch.float32,
                 timeout: float = 5.0, handshake_timeout: float = 5.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, link: LinkSpec | str | None = None,
                 ssl_context=None, advertise_host: str | None = None,
                 expected_names: set[str] | None = None):
        """Listen on host:port (0 = a free port) for `world_size - 1` workers.

        allreduce: "star" (default), "ring" or "gloo". wire_dtype: dtype partial sums
        travel in (float32, bfloat16, float16); sums are computed in float32 (gloo: in
        the wire dtype). timeout: seconds any collective or reply may wait. link: emulate
        a link on everything this process sends ("latency=5ms,bandwidth=300mbit").
        ssl_context: serve wss:// (tls.server_context). expected_names: admit only workers
        with these names (the devices a plan was made for), so a device that registers while
        the master re-plans cannot take a planned device's rank; None admits anyone."""
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
        self.rank = 0
        self._token = token
        self._link = Link(self.link) if self.link else None
        self._cond = threading.Condition()
        self._peers: dict[int, _Peer] = {}
        self._star = StarReducer()            # loop side of the star all-reduce
        self._ring_reducer = RingReducer()    # loop side of the ring all-reduce
        self._steps = Steps()
        self._setup_q: queue.SimpleQueue = queue.SimpleQueue()
        self._comm: Communicator | None = None
        self._ring_links: RingLinks | None = None
        self._ring_gen = 0
        self._ring_members: dict[int, int] | None = None
        self._closed = False
        self._io = LoopThread("tpi-hub")
        try:
            self._server = self._io.run(self._serve(host, port, ssl_context), 30)
        except BaseException:
            self._io.stop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"{'wss' if ssl_context else 'ws'}://{advertise_host or _advertised(host)}" \
                   f":{self.port}"
        log.info("hub listening on %s:%d (%s, world %d, %s)", host, self.port, allreduce,
                 world_size, self.link or "no link emulation")

    # ---- event-loop side ---------------------------------------------------------------

    async def _serve(self, host: str, port: int, ssl_context):
        if self.allreduce == "ring":
            r = self._ring_reducer
            self._ring_links = RingLinks(0, self.world_size, self._token, r.on_chunk,
                                         r.on_lost, self._link, self.max_bytes, self.timeout)
        return await serve(self._handle, host, port, compression=None,
                           max_size=self.max_bytes, ssl=ssl_context, close_timeout=2)

    def _welcome(self, hello, rank: int):
        return handshake.welcome(self._token, hello, rank, self.world_size, self.allreduce,
                                 str(self.wire_dtype).removeprefix("torch."))

    async def _handle(self, ws) -> None:
        conn = Conn(ws, self._link)
        try:
            hello = await handshake.accept(conn, self._token, self.handshake_timeout,
                                           self.max_bytes)
        except handshake.JoinRefused as e:
            log.warning("refused %s (%s): %s", conn.peer, e.code, e)
            return
        except ConnectionClosed as e:
            log.warning("%s left during the handshake: %s", conn.peer, e)
            return
        if hello.purpose == "ring":
            if self._ring_links is None:
                await handshake.refuse(conn, "protocol", "this master does not run a ring")
                return
            conn.put(encode(self._welcome(hello, 0)))
            await self._ring_links.accept(conn, hello)
            return
        if hello.purpose != "join":
            await handshake.refuse(conn, "protocol", f"unknown purpose {hello.purpose!r}")
            return
        with self._cond:
            rank, refusal = self._pick_rank(hello.want_rank, hello.name)
            if rank is not None:
                peer = _Peer(rank, hello.name, conn)
                self._peers[rank] = peer
                conn.put(encode(self._welcome(hello, rank), step=self._steps.current))
                self._cond.notify_all()
        if rank is None:
            log.warning("refused %s: %s", conn.peer, refusal[1])
            await handshake.refuse(conn, *refusal)
            return
        log.info("rank %d joined from %s%s", rank, conn.peer,
                 f" ({hello.name})" if hello.name else "")
        pinger = asyncio.get_running_loop().create_task(self._ping(peer))
        try:
            reason, bad = await self._read(peer)
        finally:
            pinger.cancel()
        with self._cond:                 # free the rank before the peer can see the close
            if self._peers.get(rank) is peer:
                del self._peers[rank]
            self._cond.notify_all()
        self._star.on_lost(conn.id, rank, reason)
        self._ring_reducer.on_lost(conn.id, rank, reason)
        peer.control.put(_LOST)
        if bad is not None:
            await handshake.refuse(conn, "protocol", bad)
        if not self._closed:
            clean = "received 1000" in reason or "received 1001" in reason
            (log.info if clean else log.warning)("rank %d left: %s", rank, reason)

    def _pick_rank(self, want: int | None, name: str):
        if self.expected_names is not None and name not in self.expected_names:
            return None, ("not_planned", f"{name or 'an unnamed worker'} is not in the current plan; "
                                         "it is admitted at the master's next re-plan")
        free = [r for r in range(1, self.world_size) if r not in self._peers]
        if want is not None and not 1 <= want < self.world_size:
            return None, ("bad_rank", f"rank {want} outside 1..{self.world_size - 1}")
        if want is not None and want not in free:
            return None, ("rank_taken", f"rank {want} is held by a connected worker")
        if not free:
            return None, ("full", f"group full: all {self.world_size - 1} worker ranks taken")
        return (want if want is not None else free[0]), None

    @staticmethod
    async def _ping(peer: _Peer) -> None:
        """Measure the worker's round trip now and then: a Ping through this process's
        uplink, answered at once by the worker's event loop through its own."""
        loop, nonce = asyncio.get_running_loop(), 0
        while True:
            nonce += 1
            peer.ping = (nonce, loop.time())
            peer.conn.put(encode(Ping(nonce=nonce)))
            await asyncio.sleep(PING_INTERVAL_S)

    async def _read(self, peer: _Peer) -> tuple[str, str | None]:
        """Route one worker's frames until its connection ends or it breaks the protocol;
        returns why it ended, and what to tell the peer if it broke the protocol."""
        ws, conn = peer.conn.ws, peer.conn
        while True:
            try:
                data = await ws.recv()
            except ConnectionClosed as e:
                return f"connection closed ({e})", None
            try:
                h = read_header(data, self.max_bytes)
                cls = MESSAGE_TYPES[h.kind]
                if cls is Partial:
                    self._star.on_partial(conn.id, peer.rank, h, data)
                    continue
                if cls is Pong:
                    pong = decode(data, header=h, max_bytes=self.max_bytes).msg
                    if peer.ping is not None and pong.nonce == peer.ping[0]:
                        peer.rtt_s = asyncio.get_running_loop().time() - peer.ping[1]
                    continue
                if cls.ORIGIN == "hub" or cls.CHANNEL in ("handshake", "collective"):
                    raise ProtocolError(f"{cls.__name__} is not accepted from a worker")
                msg = decode(data, header=h, max_bytes=self.max_bytes).msg
            except ProtocolError as e:
                log.warning("rank %d sent a bad frame, disconnecting it: %s", peer.rank, e)
                return f"protocol error: {e}", str(e)
            if isinstance(msg, Error):
                log.warning("rank %d reports %s: %s", peer.rank, msg.code, msg.message)
            elif isinstance(msg, PeerInfo):
                with self._cond:
                    peer.ring_url = msg.ring_url
                    self._cond.notify_all()
            elif isinstance(msg, SetupDone):
                self._setup_q.put((peer.rank, msg))
            else:
                peer.control.put(msg)

    @staticmethod
    def _put_all(conns: list[Conn], data: bytes) -> None:
        for c in conns:
            c.put(data)

    async def _shutdown(self) -> None:
        self._server.close()
        with self._cond:
            peers = list(self._peers.values())
        for p in peers:
            await p.conn.close(1001, "master shutting down")
        if self._ring_links is not None:
            await self._ring_links.close()
        await self._server.wait_closed()

    # ---- engine side -------------------------------------------------------------------

    def wait_for_workers(self, n: int | None = None, timeout: float | None = None) -> list[int]:
        """Block until at least `n` (default: all N-1) workers are connected."""
        n = self.world_size - 1 if n is None else n
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._peers) >= n, timeout):
                raise CommError(f"only {len(self._peers)} of {n} workers joined within "
                                f"{timeout:g}s")
            return sorted(self._peers)

    def workers(self) -> dict[int, WorkerInfo]:
        with self._cond:
            return {r: WorkerInfo(r, p.name, p.conn.peer, p.ring_url, p.rtt_s)
                    for r, p in sorted(self._peers.items())}

    def broadcast(self, msg: Message) -> list[int]:
        """Send `msg` to every connected worker; opens a new collective epoch (steps.py).
        Returns the ranks it was sent to.

        Ring mode: if the workers changed since the ring was built and all are present, the
        ring is rebuilt first, so the steps that follow `msg` find it ready everywhere."""
        if self.allreduce == "ring" and self._ring_stale():
            with self._cond:
                complete = len(self._peers) == self.world_size - 1
            if complete:
                try:
                    self._build_ring(2 * self.timeout)
                except CommError as e:
                    log.warning("ring rebuild before broadcast failed: %s", e)
        with self._cond:
            step = self._steps.new_epoch()
            peers = list(self._peers.values())
        self._io.call(self._put_all, [p.conn for p in peers],
                      encode(msg, step=step, max_bytes=self.max_bytes))
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
            if self._ring_stale():
                self._build_ring(timeout)
            self._comm = self._comm or RingCommunicator(self)
        elif self._comm is None:
            self._comm = self._setup_gloo(timeout)
        return self._comm

    def close(self) -> None:
        """Disconnect every worker and stop listening. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._comm is not None:
            self._comm.close()
        try:
            self._io.run(self._shutdown(), 10)
        except Exception as e:  # noqa: BLE001 - best effort on shutdown
            log.debug("hub shutdown: %s", e)
        self._io.stop()

    def __enter__(self) -> StarHub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing for the communicators -------------------------------------------------

    def _peer(self, rank: int) -> _Peer:
        with self._cond:
            peer = self._peers.get(rank)
        if peer is None:
            raise CommError(f"rank {rank} is not connected")
        return peer

    def _members(self) -> list[_Peer]:
        with self._cond:
            if self._closed:
                raise CommError("hub is closed")
            return list(self._peers.values())

    def _star_begin(self) -> tuple[int, dict[int, int], list[Conn]]:
        peers = self._members()
        step = self._steps.next()
        missing = sorted(set(range(1, self.world_size)) - {p.rank for p in peers})
        if missing:
            err = CommError(f"rank(s) {missing} not connected")
            self._collective_failed(step, err)
            raise err
        return step, {p.conn.id: p.rank for p in peers}, [p.conn for p in peers]

    def _ring_begin(self) -> tuple[int, dict[int, int]]:
        peers = self._members()
        step = self._steps.next()
        members = {p.rank: p.conn.id for p in peers}
        if members != self._ring_members:
            err = CommError("the ring was not built for the current workers; call "
                            "hub.communicator() again after workers join or leave")
            self._collective_failed(step, err)
            raise err
        return step, {conn: rank for rank, conn in members.items()}

    def _collective_failed(self, step: int, exc: Exception) -> None:
        """Mark the epoch dead here and on every worker (Abort), so nobody waits for it."""
        epoch = step >> 32
        self._steps.kill(epoch, str(exc))
        with self._cond:
            conns = [p.conn for p in self._peers.values()]
        data = encode(Abort(reason=str(exc)[:1000]), step=step_of(epoch, 0))
        self._io.call(self._put_all, conns, data)
        log.warning("collective %d:%d failed, epoch %d aborted: %s", epoch,
                    step & 0xFFFFFFFF, epoch, exc)

    def _ring_stale(self) -> bool:
        with self._cond:
            members = {r: p.conn.id for r, p in self._peers.items()}
        return members != self._ring_members or not self._ring_links.healthy()

    def _build_ring(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.wait_for_workers(timeout=timeout)
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self._peers) == self.world_size - 1
                and all(p.ring_url for p in self._peers.values()),
                max(0.0, deadline - time.monotonic()))
            if not ok:
                raise CommError("workers did not announce their ring ports in time")
            peers = dict(self._peers)
            self._ring_gen += 1
            gen = self._ring_gen
        setup = RingSetup(generation=gen, peers={str(r): p.ring_url for r, p in peers.items()})
        self._io.call(self._put_all, [p.conn for p in peers.values()],
                      encode(setup, step=self._steps.current))
        if self.world_size > 1:
            self._io.run(self._ring_links.build(gen, peers[1].ring_url),
                         max(0.1, deadline - time.monotonic()))
        pending = set(peers)
        while pending:
            try:
                rank, done = self._setup_q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CommError(f"ring setup: no answer from rank(s) {sorted(pending)}") \
                    from None
            if done.generation != gen:
                continue
            if not done.ok:
                raise CommError(f"ring setup failed on rank {rank}: {done.detail}")
            pending.discard(rank)
        self._ring_members = {r: p.conn.id for r, p in peers.items()}
        log.info("ring generation %d ready over %d devices", gen, self.world_size)

    def _setup_gloo(self, timeout: float) -> Communicator:
        peers = self.wait_for_workers(timeout=timeout)
        store = make_store("0.0.0.0", 0, self.world_size, True, timeout)
        msg = GlooSetup(port=store.port, host=None, timeout=timeout)
        with self._cond:
            conns = [p.conn for p in self._peers.values()]
        self._io.call(self._put_all, conns, encode(msg, step=self._steps.current))
        comm = GlooCommunicator(0, self.world_size, store, timeout, self.wire_dtype)
        log.info("gloo group of %d formed (workers %s)", self.world_size, peers)
        return comm
