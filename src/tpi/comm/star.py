"""Star all-reduce: two hops whatever the device count.

Workers send their partial (Partial) to the hub; the hub waits for all of them (they are
received concurrently by the per-connection reader tasks), adds them to its own in float32
in rank order, rounds the sum once to the wire dtype and sends it back (Reduced). The hub
returns the same rounded values, so every device holds an identical sum.
"""
from __future__ import annotations

import time

import torch

from tpi.comm.base import CommError, Communicator
from tpi.comm.inbox import Aborted
from tpi.protocol import Partial, ProtocolError, Reduced, decode, encode


class HubStarCommunicator(Communicator):
    """Rank 0's side, over a StarHub."""

    rank = 0

    def __init__(self, hub):
        self._hub = hub
        self.world_size = hub.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        hub = self._hub
        step, group = hub._star_begin()            # group: conn id -> rank
        deadline = time.monotonic() + hub.timeout
        acc = tensor.detach().to(torch.float32, copy=True)   # same shape as tensor
        shape = tuple(tensor.shape)
        try:
            arrivals = hub._inbox.take(group, group, step, 0, deadline)
            for rank in sorted(arrivals):
                a = arrivals[rank]
                acc += decode(a.data, header=a.header, expect=Partial, step=step,
                              shape=shape, dtype=hub.wire_dtype).msg.tensor
            out = acc.to(hub.wire_dtype)           # rounded once, sent to all, returned here
            data = encode(Reduced(out), step=step, max_bytes=hub.max_bytes)
        except (CommError, ProtocolError) as e:
            hub._collective_failed(step, e)
            raise CommError(f"star all_reduce on the master: {e}") from e
        hub._send_group(group, data)
        return out.to(tensor.dtype)


class ClientStarCommunicator(Communicator):
    """A worker's side, over a StarClient."""

    def __init__(self, client):
        self._client = client
        self.rank, self.world_size = client.rank, client.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        c = self._client
        step = c._collective_begin()
        hub = c._conn.id
        try:
            c._send(encode(Partial(tensor), step=step, wire_dtype=c.wire_dtype,
                           max_bytes=c.max_bytes))
            a = c._inbox.take({hub: 0}, (hub,), step, 0, time.monotonic() + c.timeout)[0]
            out = decode(a.data, header=a.header, expect=Reduced, step=step,
                         shape=tuple(tensor.shape), dtype=c.wire_dtype).msg.tensor
        except (CommError, ProtocolError) as e:
            c._collective_failed(step, e)
            if isinstance(e, Aborted):
                raise
            raise CommError(f"star all_reduce on rank {self.rank}: {e}") from e
        return out.to(tensor.dtype)
