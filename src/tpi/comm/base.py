"""The communicator interface the engine talks to.

A tensor-parallel layer ends with an explicit `comm.all_reduce(partial)`: every device
passes its partial sum and every device gets back the same total. Implementations:
in-process (threads, for tests and `--transport inproc`) and over WebSockets (star, ring)
or torch.distributed gloo (in `tpi.comm.*`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class CommError(RuntimeError):
    """A collective could not complete: a peer vanished, timed out or sent garbage."""


class Communicator(ABC):
    """One device's handle on the group. `rank` 0 is the master."""

    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Sum `tensor` over all devices; every device receives the same sum.

        Blocks until the sum is known; raises CommError on timeout or a lost peer.
        The input may be reused by the caller; the result is a new tensor.
        `exact`: the tensor travels and is summed in float32 whatever the configured wire
        dtype (the output head's candidates carry token ids; every device must pass the same
        flag for the same all-reduce).
        """

    def gather(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Every device's `tensor` to the master only, exactly (float32): rank 0 gets
        (N, *shape) in rank order, every other rank None. The output head's candidates go
        this way, so the chosen tokens stay on the master.

        This default rides on an exact all-reduce of a zero-padded (N, *shape) tensor, so
        every device still receives everything (the ring and gloo transports, benchmark
        baselines); the star (the default transport) overrides it with a true gather in
        which a worker sends and receives nothing back."""
        stacked = torch.zeros(self.world_size, *tensor.shape, dtype=torch.float32)  # (N, *shape)
        stacked[self.rank] = tensor
        total = self.all_reduce(stacked, exact=True)
        return total if self.rank == 0 else None

    def close(self) -> None:
        """Release sockets or threads. Idempotent."""


def reduce_sum(parts: list[torch.Tensor], wire: torch.dtype) -> torch.Tensor:
    """The group's sum as every transport computes it: rank 0's tensor as it is, every
    other rank's as it arrives in the wire dtype, added in float32 in rank order, rounded
    once to the wire dtype. In-process and star give the same bits."""
    acc = parts[0].detach().to(torch.float32, copy=True)  # the inputs' shape
    for part in parts[1:]:
        acc += part.detach().to(wire)
    return acc.to(wire)
