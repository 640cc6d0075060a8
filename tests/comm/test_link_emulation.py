"""Link emulation: every message a process sends is delayed like a real link, pipelined
(a queue with delivery times), never a sleep that blocks the sender. Generous bounds: the
machine running the tests may be busy."""
import threading
import time

import pytest
import torch

from tpi.comm.client import StarClient
from tpi.comm.drill import run_master
from tpi.comm.hub import StarHub
from tpi.protocol import Shutdown


@pytest.mark.parametrize("mode,n,latency,hops", [("star", 2, 20, 2), ("star", 4, 20, 2),
                                                 ("ring", 3, 10, 4)])
def test_all_reduce_pays_hops_times_latency(make_group, mode, n, latency, hops):
    link = f"latency={latency}ms"
    g = make_group(n, mode, link=link, worker_kwargs={"link": link})
    comm = g.start()
    r = run_master(g.hub, comm, reps=15, shape=[1, 1, 576])
    want = hops * latency / 1e3
    assert want * 0.95 <= r.median <= want + 0.08, f"median {r.median * 1e3:.1f} ms"
    assert r.max_error() <= 1e-5 * float(r.expected.abs().max())


def test_bandwidth_serializes(make_group):
    link = "latency=1ms,bandwidth=100mbit"
    g = make_group(2, "star", link=link, worker_kwargs={"link": link})
    comm = g.start()
    r = run_master(g.hub, comm, reps=3, shape=[262144])          # 1 MiB each way
    per_hop = 262144 * 4 * 8 / 100e6                              # ~84 ms at 100 Mbit/s
    assert 2 * per_hop <= r.median <= 2 * per_hop + 0.15, f"median {r.median * 1e3:.0f} ms"


def test_latency_does_not_block_the_sender(token):
    with StarHub(2, token, link="latency=100ms") as hub:
        with StarClient.connect(hub.url, token) as client:
            t0 = time.monotonic()
            for i in range(20):
                hub.broadcast(Shutdown(reason=str(i)))
            sent = time.monotonic() - t0
            seqs = [int(client.recv_control(timeout=5).reason) for _ in range(20)]
            arrived = time.monotonic() - t0
    assert seqs == list(range(20))                 # in order
    assert sent < 0.05                             # broadcast returns at once
    assert 0.095 <= arrived < 0.4                  # all after ~one latency, not 20 of them


def test_link_applies_to_the_worker_side_too(token):
    with StarHub(2, token) as hub:
        with StarClient.connect(hub.url, token, link="latency=50ms") as client:
            comm_w = client.communicator()
            comm_m = hub.communicator()
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("w", comm_w.all_reduce(
                torch.ones(4))))
            t0 = time.monotonic()
            t.start()
            y = comm_m.all_reduce(torch.ones(4))
            took = time.monotonic() - t0
            t.join(5)
    assert torch.equal(y, torch.full((4,), 2.0)) and torch.equal(out["w"], y)
    assert 0.045 <= took < 0.3                      # one delayed hop (worker -> hub)


def test_hub_measures_each_workers_round_trip_through_the_links(token):
    """The RTT /api/cluster shows: a Ping through the hub's link, the Pong through the
    worker's, answered on the worker's event loop (not behind its engine thread)."""
    with StarHub(2, token, link="latency=30ms") as hub:
        with StarClient.connect(hub.url, token, link="latency=20ms"):
            deadline = time.monotonic() + 10
            while hub.workers()[1].rtt_s is None:
                assert time.monotonic() < deadline, "no round trip measured"
                time.sleep(0.05)
            rtt = hub.workers()[1].rtt_s
            assert 0.050 <= rtt < 0.050 + 0.5, rtt
