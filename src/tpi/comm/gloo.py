"""torch.distributed gloo all-reduce: a benchmark baseline (`--allreduce gloo`), not for
untrusted networks.

The master hosts the TCPStore, bound to the hub's own interface (not every interface), and
tells the workers its port (GlooSetup over the authenticated hub connection); everyone then
joins one gloo process group. Neither the store nor gloo's own connections authenticate
anything: anyone who can reach them can disturb the group. Use star or ring (join token,
per-frame tags, optional TLS) for a real deployment. Gloo sums in the tensor's dtype, so the
wire dtype is also the summation dtype here. A lost peer fails the call after gloo's own
timeout; the group cannot be rebuilt without restarting the processes (one group per
process).
"""
from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta
from urllib.parse import urlsplit

import torch

from tpi.comm.base import CommError, Communicator
from tpi.protocol import GlooSetup

log = logging.getLogger("tpi.comm")


def make_store(host: str, port: int, world_size: int, is_master: bool, timeout: float):
    """The master's store listens on `host` only (a socket bound here, handed to torch)."""
    import torch.distributed as dist  # heavy; only when gloo is chosen

    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timedelta(seconds=timeout),
                             wait_for_workers=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=64)
    store = dist.TCPStore(host, sock.getsockname()[1], world_size, True,
                          timedelta(seconds=timeout), wait_for_workers=False,
                          master_listen_fd=sock.detach())
    return store


class GlooCommunicator(Communicator):
    def __init__(self, rank: int, world_size: int, store, timeout: float,
                 wire_dtype: torch.dtype = torch.float32):
        import torch.distributed as dist

        self.rank, self.world_size, self.wire_dtype = rank, world_size, wire_dtype
        self._dist = dist
        try:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001 - torch raises several types here
            raise CommError(f"gloo init on rank {rank}: {e}") from e
        self._closed = False

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        if self._closed:
            raise CommError("gloo communicator is closed")
        buf = tensor.detach().to(torch.float32 if exact else self.wire_dtype, copy=True).contiguous()
        try:
            self._dist.all_reduce(buf)
        except Exception as e:  # noqa: BLE001 - RuntimeError / DistBackendError
            raise CommError(f"gloo all_reduce on rank {self.rank}: {e}") from e
        return buf.to(tensor.dtype)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort
                pass


def host_group(hub, timeout: float) -> GlooCommunicator:
    """Master: wait for every worker, open the store on the hub's interface, tell the
    workers (GlooSetup) and join the group as rank 0."""
    peers = hub.wait_for_workers(timeout=timeout)
    store = make_store(hub.bind_host, 0, hub.world_size, True, timeout)
    hub.send_setup(GlooSetup(port=store.port, host=None, timeout=timeout))
    comm = GlooCommunicator(0, hub.world_size, store, timeout, hub.wire_dtype)
    log.info("gloo group of %d formed (workers %s)", hub.world_size, peers)
    return comm


class LazyGlooCommunicator(Communicator):
    """A worker's gloo communicator, formed at its first all_reduce once the master's
    GlooSetup arrived (`joined(setup)`, called from the client's I/O loop), so a worker can
    hold it before the master sets gloo up."""

    def __init__(self, rank: int, world_size: int, hub_url: str, wire_dtype: torch.dtype,
                 timeout: float):
        self.rank, self.world_size, self._url = rank, world_size, hub_url
        self._wire, self._timeout = wire_dtype, timeout
        self._comm: GlooCommunicator | Exception | None = None
        self._ready = threading.Event()

    def joined(self, setup: GlooSetup) -> None:
        """Join the group as soon as the master sets it up, whatever the engine thread is
        doing (one helper thread, once): init_process_group blocks until all ranks join."""
        if not self._ready.is_set():
            threading.Thread(target=self._join, args=(setup,), daemon=True,
                             name="tpi-gloo-join").start()

    def _join(self, setup: GlooSetup) -> None:
        try:
            host = setup.host or urlsplit(self._url).hostname
            store = make_store(host, setup.port, self.world_size, False, setup.timeout)
            self._comm = GlooCommunicator(self.rank, self.world_size, store, setup.timeout,
                                          self._wire)
        except Exception as e:  # noqa: BLE001 - handed to the first all_reduce
            self._comm = CommError(f"joining the gloo group: {e}")
        self._ready.set()

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        if not self._ready.wait(self._timeout):
            raise CommError(f"the master did not set up gloo within {self._timeout:g}s")
        if isinstance(self._comm, Exception):
            raise self._comm
        return self._comm.all_reduce(tensor, exact)

    def close(self) -> None:
        if isinstance(self._comm, GlooCommunicator):
            self._comm.close()
