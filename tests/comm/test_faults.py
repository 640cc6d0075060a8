"""A worker killed (SIGKILL) or stalled (SIGSTOP) in the middle of a run of all-reduces:
the master's all_reduce raises CommError quickly, the survivors' calls fail too (Abort),
and once a worker (re)joins, all_reduce works again."""
import re
import signal
import threading
import time

import pytest
import torch

from tpi.comm.base import CommError
from tpi.comm.drill import base_input, run_master
from tpi.protocol import CollectiveDrill, Reply

SHAPE = [1, 1, 576]


def run_until_failure(g, comm, action, after=0.5):
    """Start an endless drill on every device, run `action` after `after` s; returns
    (seconds from the action to the master's CommError, the error)."""
    ranks = g.hub.broadcast(CollectiveDrill(seq=7, reps=10**7, shape=SHAPE))
    acted = []
    timer = threading.Timer(after, lambda: (action(), acted.append(time.monotonic())))
    timer.start()
    x = base_input(0, 0, SHAPE, torch.float32)
    with pytest.raises(CommError) as err:
        for i in range(10**7):
            comm.all_reduce(x * (1 + i % 7))
    failed = time.monotonic()
    timer.join()
    return failed - acted[0], err.value, ranks


@pytest.mark.parametrize("mode", ["star", "ring"])
def test_killed_worker(make_group, mode):
    g = make_group(4, mode, timeout=3.0, worker_kwargs={"timeout": 3.0})
    comm = g.start()
    run_master(g.hub, comm, reps=5, shape=SHAPE)
    took, err, ranks = run_until_failure(g, comm, lambda: g.kill(2))
    assert took < 5.0, f"CommError only {took:.1f}s after the kill"
    assert re.search(r"rank 2 lost|rank\(s\) \[2\] not connected", str(err)), str(err)
    for r in (1, 3):                                   # survivors' drills failed too
        reply = g.hub.recv(r, timeout=10)
        assert isinstance(reply, Reply) and not reply.ok     # aborted, or lost a ring link
    with pytest.raises(CommError, match="aborted"):    # the epoch stays dead until a broadcast
        comm.all_reduce(torch.ones(3))
    g.procs[2].join(5)
    g.spawn(2)                                         # a replacement takes rank 2
    assert g.hub.wait_for_workers(timeout=60) == [1, 2, 3]
    # the same communicator object works on; in ring mode the drill's broadcast rebuilds
    # the ring with the newcomer before the steps start
    r = run_master(g.hub, comm, reps=20, shape=SHAPE, seq=8)
    assert r.max_error() <= 1e-5 * float(r.expected.abs().max())
    for m in r.replies.values():
        assert torch.equal(m.tensor, r.master_out)


def test_stalled_worker(make_group):
    g = make_group(3, "star", timeout=1.0, worker_kwargs={"timeout": 3.0})
    comm = g.start()
    took, err, ranks = run_until_failure(g, comm, lambda: g.kill(2, signal.SIGSTOP))
    assert 0.9 < took < 3.0 and "timed out" in str(err) and "[2]" in str(err)
    assert not g.hub.recv(1, timeout=10).ok             # the survivor was told
    g.kill(2, signal.SIGCONT)                            # the staller wakes up, learns of the
    assert not g.hub.recv(2, timeout=10).ok             # abort, and rejoins the next epoch
    r = run_master(g.hub, comm, reps=20, shape=SHAPE, seq=8)
    assert r.max_error() <= 1e-5 * float(r.expected.abs().max())


def test_missing_worker_fails_at_once(make_group):
    g = make_group(3, "star", timeout=5.0)
    comm = g.hub.communicator()
    t0 = time.monotonic()
    with pytest.raises(CommError, match=r"rank\(s\) \[1, 2\] not connected"):
        comm.all_reduce(torch.ones(2))
    assert time.monotonic() - t0 < 0.5
