"""Collective step numbers: which all-reduce a frame belongs to.

A step is (epoch, counter), packed as epoch << 32 | counter in the frame header. Every
all_reduce takes the next counter. The master opens a new epoch with each broadcast control
message (counter back to 0); workers adopt it when the engine reads that message, so both
sides agree where the new epoch starts. When a collective fails, its whole epoch is dead on
every device: later all_reduce calls of that epoch raise at once instead of waiting for
peers that have given up, until the next broadcast opens a fresh epoch.
"""
from __future__ import annotations

import threading

from tpi.comm.base import CommError
from tpi.protocol import step_of


class Steps:
    def __init__(self, step: int = 0):
        self._lock = threading.Lock()
        self.epoch, self.counter = step >> 32, step & 0xFFFFFFFF
        self.dead_epoch, self.dead_reason = -1, ""

    @property
    def current(self) -> int:
        """The step the next collective will use."""
        return step_of(self.epoch, self.counter)

    def next(self) -> int:
        """Claim the next step; CommError if this epoch was aborted."""
        with self._lock:
            if self.epoch <= self.dead_epoch:
                raise CommError(f"collectives of epoch {self.epoch} were aborted "
                                f"({self.dead_reason}); they resume after the master's next "
                                f"broadcast")
            step = step_of(self.epoch, self.counter)
            self.counter += 1
            return step

    def new_epoch(self) -> int:
        """Master: open the next epoch; returns its first step."""
        with self._lock:
            self.epoch += 1
            self.counter = 0
            return step_of(self.epoch, 0)

    def adopt(self, step: int) -> None:
        """Worker: move forward to a step announced by the hub (never backwards)."""
        with self._lock:
            if step > step_of(self.epoch, self.counter):
                self.epoch, self.counter = step >> 32, step & 0xFFFFFFFF

    def kill(self, epoch: int, reason: str) -> None:
        with self._lock:
            if epoch > self.dead_epoch:
                self.dead_epoch, self.dead_reason = epoch, reason
