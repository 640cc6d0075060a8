"""The in-process group sums exactly as the network does: the star all-reduce over real
sockets and InProcGroup give the same bits for the same inputs (float32 accumulation in rank
order, one rounding to the wire dtype), so tests on `--transport inproc` see the cluster's
numbers."""
import threading

import pytest
import torch

from tpi.comm.client import StarClient
from tpi.comm.hub import StarHub
from tpi.comm.inproc import InProcGroup

TOKEN = "test-join-token-long-enough"


def _inputs(n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 576, generator=g) * 10 ** r).to(dtype) for r in range(n)]  # (4, 576)


def _run_all(comms, inputs, exact):
    out = [None] * len(comms)

    def one(r):
        out[r] = comms[r].all_reduce(inputs[r], exact=exact)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(1, len(comms))]
    for t in threads:
        t.start()
    one(0)
    for t in threads:
        t.join(30)
    return out


@pytest.mark.parametrize("dtype,wire,exact", [
    (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, False),
    (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, torch.bfloat16, True),
])
def test_inproc_sum_is_bitwise_the_star_sum(dtype, wire, exact):
    n = 4
    inputs = _inputs(n, dtype)
    with StarHub(n, TOKEN, wire_dtype=wire) as hub:
        clients = [StarClient.connect(hub.url, TOKEN, want_rank=r) for r in range(1, n)]
        try:
            hub.wait_for_workers(timeout=30)
            star = _run_all([hub.communicator()] + [c.communicator() for c in clients],
                            inputs, exact)
        finally:
            for c in clients:
                c.close()
    group = InProcGroup(n, wire_dtype=wire)
    inproc = _run_all([group.communicator(r) for r in range(n)], inputs, exact)
    for r in range(n):
        assert star[r].dtype == inproc[r].dtype == dtype
        assert torch.equal(star[r], star[0])
        assert torch.equal(inproc[r], star[r]), f"rank {r}"


def test_inproc_default_wire_is_the_tensor_dtype():
    """Without a wire dtype the group rounds to each tensor's own dtype (the master's default
    wire dtype is its compute dtype) after a float32 accumulation."""
    inputs = _inputs(3, torch.bfloat16)
    group = InProcGroup(3)
    got = _run_all([group.communicator(r) for r in range(3)], inputs, False)[0]
    want = (inputs[0].float() + inputs[1].float() + inputs[2].float()).to(torch.bfloat16)
    assert torch.equal(got, want)
