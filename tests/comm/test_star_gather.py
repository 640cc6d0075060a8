"""The master's gather of partials (`tpi.comm.star._gather`) over real data sockets when a
rank's socket is closed under it: the hub's control thread drops a rank that sent a bad
control frame (tests/cluster/test_bad_breakdown.py) at any moment, also between the gather
taking that rank's partial and unregistering it from its poller. The close is placed at that
moment by the rank's `take` here; on 527e658 the gather raised ValueError ("file descriptor
cannot be a negative integer") instead of finishing."""
from __future__ import annotations

import socket
import time

import torch

from tpi.comm.dataplane import DataSocket
from tpi.comm.session import Session
from tpi.comm.star import Frame, _gather
from tpi.protocol import Partial

KEY, STEP = b"k" * 32, (7 << 32) | 3


class ClosedAfterTake(DataSocket):
    """A real data socket that is shut down right after its frame is taken, as the hub's
    other thread may do."""

    def take(self) -> memoryview:
        frame = super().take()
        self.shutdown("rank 1 sent a bad frame")
        return frame


def test_a_rank_closed_after_its_partial_arrived_still_gives_its_partial():
    master_end, worker_end = socket.socketpair()
    link = ClosedAfterTake(master_end, Session(KEY, accepting=True, channel=b"data"), 1 << 20, 5.0)
    worker = DataSocket(worker_end, Session(KEY, accepting=False, channel=b"data"), 1 << 20, 5.0)
    sent = Frame(Partial, (2, 3), torch.float32)
    sent.tensor.copy_(torch.arange(6.0).view(2, 3))                    # (2, 3)
    worker.send(sent.stamp(STEP))
    expect = Frame(Partial, (2, 3), torch.float32)
    expect.stamp(STEP)
    got = _gather({1: link}, expect, STEP, 1 << 20, time.monotonic() + 5)
    assert torch.equal(got[1], torch.arange(6.0).view(2, 3))
    assert link.lost == "rank 1 sent a bad frame"
    worker.shutdown()
