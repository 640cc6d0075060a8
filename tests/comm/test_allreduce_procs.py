"""all_reduce over N real processes on loopback equals the local sum, for star, ring and gloo.

Tolerances: float32 on the wire, |error| <= 1e-5 * max|sum| (only the summation order
differs). bfloat16 on the wire: every partial is rounded to bfloat16 (relative 2**-8)
and, in the ring and in gloo, so is every partial sum on the way, so elementwise
|error| <= (N + 1) * 2**-8 * sum_r |x_r|.
"""
import pytest
import torch

from tpi.comm.drill import base_input, expected_sum, run_master
from tpi.protocol import CollectiveDrill, DrillReport

SHAPE = [1, 1, 576]     # one decode token of SmolLM2


def check(result, n, wire, identical):
    exp = result.expected
    if wire == "float32":
        assert result.max_error() <= 1e-5 * float(exp.abs().max())
    else:
        bound = (n + 1) * 2.0 ** -8 * sum(base_input(0, r, SHAPE, torch.float32).abs() * 7
                                          for r in range(n))
        for out in [result.master_out] + [m.tensor for m in result.replies.values()]:
            assert bool(((out.float() - exp).abs() <= bound).all())
    if identical:  # star and ring: every device holds bit-identical sums
        for m in result.replies.values():
            assert torch.equal(m.tensor, result.master_out)


@pytest.mark.parametrize("mode", ["star", "ring", "gloo"])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_all_reduce_equals_local_sum(make_group, mode, n):
    g = make_group(n, mode)
    comm = g.start()
    assert (comm.rank, comm.world_size) == (0, n)
    r = run_master(g.hub, comm, reps=15, shape=SHAPE)
    check(r, n, "float32", identical=mode != "gloo")
    r = run_master(g.hub, comm, reps=3, shape=[3, 1001], seq=1)   # uneven ring chunks
    assert r.max_error() <= 1e-5 * float(r.expected.abs().max())


@pytest.mark.parametrize("mode", ["star", "ring", "gloo"])
def test_bfloat16_wire(make_group, mode):
    n = 4
    g = make_group(n, mode, wire_dtype="bfloat16")
    comm = g.start()
    r = run_master(g.hub, comm, reps=7, shape=SHAPE)
    assert r.master_out.dtype == torch.float32          # summed and returned in float32
    check(r, n, "bfloat16", identical=mode != "gloo")
    assert r.max_error() > 0                             # it really travelled as bfloat16


@pytest.mark.parametrize("mode", ["star", "ring", "gloo"])
def test_exact_all_reduce_travels_in_float32_over_a_bfloat16_wire(make_group, mode):
    """The output head's candidates (token ids as float32) must not be rounded to bfloat16."""
    n = 3
    g = make_group(n, mode, wire_dtype="bfloat16")
    comm = g.start()
    r = run_master(g.hub, comm, reps=3, shape=[2, 3, 2, 128], exact=True)   # (R, N, 2, K)
    check(r, n, "float32", identical=mode != "gloo")   # float32 tolerance: no bfloat16 rounding


def test_world_of_one(make_group):
    g = make_group(1)
    comm = g.start()
    x = torch.randn(2, 3)
    assert torch.equal(comm.all_reduce(x), x)


@pytest.mark.parametrize("mode", ["star", "ring", "gloo"])
def test_master_may_set_up_after_broadcasting(make_group, mode):
    """The order the master service uses: broadcast the step, then hub.communicator()."""
    n = 3
    g = make_group(n, mode)
    for r in range(1, n):
        g.spawn(r)
    g.hub.wait_for_workers(timeout=60)
    ranks = g.hub.broadcast(CollectiveDrill(seq=1, reps=4, shape=SHAPE))
    comm = g.hub.communicator()
    x = base_input(0, 0, SHAPE, torch.float32)
    outs = [comm.all_reduce(x * (1 + i % 7)) for i in range(4)]
    replies = g.hub.gather(timeout=30, ranks=ranks)
    assert all(isinstance(m, DrillReport) for m in replies.values()), replies
    exp = expected_sum(0, n, 3, SHAPE, torch.float32)
    assert (outs[-1] - exp).abs().max() <= 1e-5 * exp.abs().max()
