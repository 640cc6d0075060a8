"""A collective in progress, shared between the engine thread and the event loop.

The engine thread hands its tensor to the loop once (`LoopThread.call`) and blocks on the
round's reply queue; the loop drives the whole exchange as frames arrive (star.py, ring.py)
and puts the result, or the exception, exactly once. Two thread handoffs per collective,
whatever the number of hops.

A round fails at once when a connection it depends on is lost or the master aborts its
epoch (steps.py), and after `timeout` seconds in any case.
"""
from __future__ import annotations

import queue
from typing import Any

from tpi.comm.base import CommError


class Aborted(CommError):
    """The master aborted the collectives of this epoch (another device failed)."""

    def __init__(self, epoch: int, reason: str):
        super().__init__(f"collectives of epoch {epoch} aborted by the master: {reason}")
        self.epoch = epoch


class Round:
    def __init__(self, step: int, watch: dict[int, int]):
        self.step = step
        self.watch = watch                          # conn id -> rank; losing one fails us
        self.done = False
        self._reply: queue.SimpleQueue = queue.SimpleQueue()

    def finish(self, result: Any) -> None:
        """Loop side: deliver the result (or an exception) once."""
        if not self.done:
            self.done = True
            self._reply.put(result)

    def wait(self, timeout: float, what: str) -> Any:
        """Engine side: the result; raises the round's exception or CommError on timeout."""
        try:
            res = self._reply.get(timeout=timeout)
        except queue.Empty:
            self.done = True
            raise CommError(f"timed out after {timeout:g}s at step {self.step >> 32}:"
                            f"{self.step & 0xFFFFFFFF} waiting for {what}") from None
        if isinstance(res, BaseException):
            raise res
        return res


class Tracker:
    """Loop-side bookkeeping common to every reducer: the current round, lost connections,
    aborted epochs. Methods run on the event-loop thread only."""

    def __init__(self) -> None:
        self.round: Round | None = None
        self._dead: dict[int, str] = {}       # conn id -> why it was lost
        self._aborted = (-1, "")               # (highest aborted epoch, reason)

    def begin(self, rnd: Round) -> bool:
        """Make `rnd` current; False (and `rnd` failed) if it cannot even start."""
        self.round = rnd
        for conn, rank in rnd.watch.items():
            if conn in self._dead:
                self.fail(rnd, CommError(f"rank {rank} lost: {self._dead[conn]}"))
                return False
        epoch, reason = self._aborted
        if rnd.step >> 32 <= epoch:
            self.fail(rnd, Aborted(epoch, reason))
            return False
        return True

    def fail(self, rnd: Round, exc: BaseException) -> None:
        rnd.finish(exc)
        if self.round is rnd:
            self.round = None

    def succeed(self, rnd: Round, result: Any) -> None:
        rnd.finish(result)
        if self.round is rnd:
            self.round = None

    def cancel(self, rnd: Round) -> None:
        """The engine gave up waiting (timeout)."""
        rnd.done = True
        if self.round is rnd:
            self.round = None

    def on_lost(self, conn: int, rank: int, reason: str) -> None:
        self._dead[conn] = reason
        rnd = self.round
        if rnd is not None and conn in rnd.watch:
            self.fail(rnd, CommError(f"rank {rank} lost: {reason}"))

    def on_abort(self, epoch: int, reason: str) -> None:
        if epoch > self._aborted[0]:
            self._aborted = (epoch, reason)
        rnd = self.round
        if rnd is not None and rnd.step >> 32 <= epoch:
            self.fail(rnd, Aborted(epoch, reason))
