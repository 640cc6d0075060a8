"""torch.distributed gloo all-reduce: the established baseline (`--allreduce gloo`).

The master hosts the TCPStore and tells the workers its port (GlooSetup over the hub);
everyone then joins one gloo process group. Gloo sums in the tensor's dtype, so the wire
dtype is also the summation dtype here. A lost peer fails the call after gloo's own timeout;
the group cannot be rebuilt without restarting the processes (one group per process).
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch

from tpi.comm.base import CommError, Communicator


def make_store(host: str, port: int, world_size: int, is_master: bool, timeout: float):
    import torch.distributed as dist  # heavy; only when gloo is chosen

    return dist.TCPStore(host, port, world_size, is_master, timedelta(seconds=timeout),
                         wait_for_workers=False)


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


class LazyGlooCommunicator(Communicator):
    """A worker's gloo communicator, formed at its first all_reduce by `join()` (which waits
    for the master's GlooSetup), so a worker can hold it before the master sets gloo up."""

    def __init__(self, rank: int, world_size: int, join: Callable[[], GlooCommunicator]):
        self.rank, self.world_size = rank, world_size
        self._join = join
        self._comm: GlooCommunicator | None = None

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        if self._comm is None:
            self._comm = self._join()
        return self._comm.all_reduce(tensor, exact)

    def close(self) -> None:
        if self._comm is not None:
            self._comm.close()
