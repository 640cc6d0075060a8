"""N shards in one process: each rank is a thread; all_reduce meets at a condition variable.

The sum is the network's (star.py, `reduce_sum`): every partial in the wire dtype (the
tensor's own dtype unless the group was given one), accumulated in float32 in rank order,
rounded once to the wire dtype. So tests and `--transport inproc` see the same numbers, bit
for bit, as a cluster over sockets, and every rank gets the identical result.
"""
from __future__ import annotations

import threading

import torch

from tpi.comm.base import CommError, Communicator, reduce_sum


class InProcGroup:
    def __init__(self, world_size: int, timeout_s: float = 60.0,
                 wire_dtype: torch.dtype | None = None):
        """wire_dtype: the dtype partials travel in on the network (None: each tensor's own,
        as the master's default wire dtype is the compute dtype)."""
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.wire_dtype = wire_dtype
        self._cond = threading.Condition()
        self._parts: list[torch.Tensor | None] = [None] * world_size
        self._arrived = 0
        self._round = 0
        self._result: torch.Tensor | None = None
        self._broken: str | None = None

    def communicator(self, rank: int) -> "InProcCommunicator":
        return InProcCommunicator(self, rank)

    def abort(self, reason: str) -> None:
        """Wake every waiting rank with a CommError (a shard failed)."""
        with self._cond:
            self._broken = reason
            self._cond.notify_all()

    def reset(self) -> None:
        with self._cond:
            self._parts = [None] * self.world_size
            self._arrived = 0
            self._broken = None

    def _all_reduce(self, rank: int, tensor: torch.Tensor, exact: bool) -> torch.Tensor:
        with self._cond:
            if self._broken:
                raise CommError(self._broken)
            my_round = self._round
            self._parts[rank] = tensor
            self._arrived += 1
            if self._arrived == self.world_size:
                wire = torch.float32 if exact else (self.wire_dtype or tensor.dtype)
                self._result = reduce_sum(self._parts, wire).to(tensor.dtype)
                self._parts = [None] * self.world_size
                self._arrived = 0
                self._round += 1
                self._cond.notify_all()
                return self._result
            if not self._cond.wait_for(lambda: self._round != my_round or self._broken, self.timeout_s):
                raise CommError(f"in-process all_reduce timed out after {self.timeout_s}s (rank {rank})")
            if self._round == my_round:
                raise CommError(self._broken)
            return self._result


class InProcCommunicator(Communicator):
    def __init__(self, group: InProcGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        return self.group._all_reduce(self.rank, tensor, exact)
