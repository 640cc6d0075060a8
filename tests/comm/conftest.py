"""A hub in the test process and real worker processes on loopback.

Workers start from a multiprocessing forkserver that has already imported torch and the
client, so each worker process is up in a fraction of a second (a fresh interpreter
importing torch takes seconds on a small machine)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest
import torch

from tpi.comm.drill import worker_main
from tpi.comm.hub import StarHub
from tpi.protocol import Shutdown

TOKEN = "test-join-token-long-enough"
_ctx = mp.get_context("forkserver")
_ctx.set_forkserver_preload(["torch", "tpi.comm.client", "tpi.comm.drill"])


class Group:
    """A StarHub (rank 0, this process) and one worker process per other rank."""

    def __init__(self, n: int, allreduce: str = "star", worker_kwargs: dict | None = None,
                 **hub_kwargs):
        self._threads = torch.get_num_threads()    # restored in close(): other suites
        torch.set_num_threads(1)                   # share this pytest process
        self.hub = StarHub(n, TOKEN, allreduce=allreduce, **hub_kwargs)
        self.worker_kwargs = dict(worker_kwargs or {})
        self.procs: dict[int, mp.Process] = {}

    def spawn(self, rank: int, **overrides) -> mp.Process:
        kw = {"want_rank": rank, **self.worker_kwargs, **overrides}
        p = _ctx.Process(target=worker_main, args=(self.hub.url, kw.pop("token", TOKEN)),
                         kwargs=kw, daemon=True)
        p.start()
        self.procs[rank] = p
        return p

    def start(self, timeout: float = 120.0):
        for r in range(1, self.hub.world_size):
            self.spawn(r)
        self.hub.wait_for_workers(timeout=timeout)
        return self.hub.communicator(timeout=timeout)

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        os.kill(self.procs[rank].pid, sig)

    def close(self) -> None:
        try:
            self.hub.broadcast(Shutdown(reason="test over"))
        except Exception:  # noqa: BLE001
            pass
        for p in self.procs.values():
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.hub.close()
        torch.set_num_threads(self._threads)


@pytest.fixture
def token() -> str:
    return TOKEN


@pytest.fixture
def make_group():
    groups: list[Group] = []

    def make(*args, **kwargs) -> Group:
        g = Group(*args, **kwargs)
        groups.append(g)
        return g

    yield make
    for g in groups:
        g.close()
