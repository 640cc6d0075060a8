"""The hub's view of one joined worker, how ranks are handed out, and the round-trip probe.

Kept apart from hub.py so the hub reads as what it does: admit workers and route their
control messages.
"""
from __future__ import annotations

import asyncio
import queue
import socket
from dataclasses import dataclass

from tpi.comm.conn import Conn
from tpi.protocol import Ping, encode

PING_INTERVAL_S = 5.0  # how often the hub measures each worker's round trip


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    name: str
    address: str            # host:port the worker connected from
    ring_url: str | None    # where it accepts its ring predecessor (ring mode)
    rtt_s: float | None = None  # last Ping -> Pong round trip (every 5 s; None before the first),
                                # through both ends' emulated links like every other message


class Peer:
    """One joined worker: its control connection and queue, its data connection once it is
    attached (star), its ring port (ring) and its last measured round trip."""

    def __init__(self, rank: int, name: str, conn: Conn):
        self.rank, self.name, self.conn = rank, name, conn
        self.control: queue.SimpleQueue = queue.SimpleQueue()
        self.key: bytes | None = None          # the session key of its join handshake
        self.data = None                       # its DataSocket (dataplane.py), star only
        self.ring_url: str | None = None
        self.rtt_s: float | None = None
        self._ping: tuple[int, float] | None = None  # (nonce, loop time sent)

    def sent_ping(self, nonce: int, now: float) -> None:
        self._ping = (nonce, now)

    def pong(self, nonce: int, now: float) -> None:
        if self._ping is not None and nonce == self._ping[0]:
            self.rtt_s = now - self._ping[1]


async def ping(peer: Peer) -> None:
    """Measure the worker's round trip now and then: a Ping through this process's uplink,
    answered at once by the worker's event loop through its own."""
    loop, nonce = asyncio.get_running_loop(), 0
    while True:
        nonce += 1
        peer.sent_ping(nonce, loop.time())
        peer.conn.put(encode(Ping(nonce=nonce)))
        await asyncio.sleep(PING_INTERVAL_S)


def pick_rank(peers: dict[int, Peer], world_size: int, expected_names: set[str] | None,
              want: int | None, name: str):
    """(rank, None) for a worker asking for `want` (None: the lowest free rank), or
    (None, (code, message)) when it cannot join."""
    if expected_names is not None and name not in expected_names:
        return None, ("not_planned", f"{name or 'an unnamed worker'} is not in the current "
                                     "plan; it is admitted at the master's next re-plan")
    free = [r for r in range(1, world_size) if r not in peers]
    if want is not None and not 1 <= want < world_size:
        return None, ("bad_rank", f"rank {want} outside 1..{world_size - 1}")
    if want is not None and want not in free:
        return None, ("rank_taken", f"rank {want} is held by a connected worker")
    if not free:
        return None, ("full", f"group full: all {world_size - 1} worker ranks taken")
    return (want if want is not None else free[0]), None


def advertised(host: str) -> str:
    """A host workers can use in `hub.url` (pass advertise_host to choose it)."""
    if host in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
