"""Where collective frames wait for the engine thread.

Reader tasks on the event loop put `Arrival`s (a frame, not yet decoded) and `Lost`
reports into one thread-safe queue; a blocking collective takes exactly the frames it
needs. Frames from an earlier step (a collective that already failed) are dropped, frames
from a later step (a fast ring neighbour) are kept for later, an `Abort` from the hub or
the loss of a watched connection fails the collective at once, and every wait has a
deadline.
"""
from __future__ import annotations

import logging
import queue
import time
from collections.abc import Collection, Mapping
from typing import NamedTuple

from tpi.comm.base import CommError
from tpi.protocol import Abort, Header, decode

log = logging.getLogger("tpi.comm")
MAX_STASH = 256  # early frames kept; more means a peer is flooding or badly out of step


class Arrival(NamedTuple):
    conn: int       # Conn.id it came in on
    src: int        # rank of the sender
    header: Header
    data: bytes


class Lost(NamedTuple):
    conn: int
    src: int
    reason: str


class Aborted(CommError):
    """The master aborted the collectives of this epoch (another device failed)."""

    def __init__(self, epoch: int, reason: str):
        super().__init__(f"collectives of epoch {epoch} aborted by the master: {reason}")
        self.epoch = epoch


class Inbox:
    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Arrival | Lost] = queue.SimpleQueue()
        self._stash: list[Arrival] = []
        self._dead: dict[int, str] = {}  # conn id -> why it was lost

    def put(self, item: Arrival | Lost) -> None:
        """Thread-safe; called by reader tasks on the event loop."""
        self._q.put(item)

    def take(self, want: Mapping[int, int], watch: Collection[int], step: int, part: int,
             deadline: float) -> dict[int, Arrival]:
        """One frame of (step, part) from each connection in `want` (conn id -> src rank).

        Raises CommError if a connection in `watch` (or `want`) is lost, the hub aborts an
        epoch >= this step's epoch, or `deadline` (time.monotonic()) passes.
        """
        key = (step, part)
        for conn in list(want) + list(watch):
            if conn in self._dead:
                raise CommError(f"connection to rank {want.get(conn, '?')} lost: "
                                f"{self._dead[conn]}")
        got: dict[int, Arrival] = {}
        keep = []
        for a in self._stash:
            k = (a.header.step, a.header.part)
            if a.conn in want and k == key and a.conn not in got:
                got[a.conn] = a
            elif k > key:
                keep.append(a)
        self._stash = keep
        while len(got) < len(want):
            remaining = deadline - time.monotonic()
            try:
                item = self._q.get(timeout=max(remaining, 0.0)) if remaining > 0 \
                    else self._q.get_nowait()
            except queue.Empty:
                missing = sorted(want[c] for c in want if c not in got)
                raise CommError(f"timed out at step {step >> 32}:{step & 0xFFFFFFFF} "
                                f"waiting for rank(s) {missing}") from None
            if isinstance(item, Lost):
                self._dead[item.conn] = item.reason
                if item.conn in want or item.conn in watch:
                    raise CommError(f"rank {item.src} lost: {item.reason}")
                continue
            h = item.header
            if h.kind == Abort.KIND:
                if item.conn in watch and h.step >> 32 >= step >> 32:
                    reason = decode(item.data, header=h).msg.reason
                    raise Aborted(h.step >> 32, reason)
                continue
            if item.conn not in want:
                log.debug("dropping frame from connection %d (not in this collective)",
                          item.conn)
                continue
            k = (h.step, h.part)
            if k == key and item.conn not in got:
                got[item.conn] = item
            elif k > key:
                if len(self._stash) >= MAX_STASH:
                    raise CommError(f"rank {item.src} is too far ahead "
                                    f"({len(self._stash)} early frames)")
                self._stash.append(item)
            else:
                log.debug("dropping stale frame %s from rank %d (now at %s)",
                          k, item.src, key)
        return {a.src: a for a in got.values()}
