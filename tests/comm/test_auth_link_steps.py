"""Pure pieces: join-token MACs, link-spec parsing and scheduling, step bookkeeping."""
import pytest

from tpi.comm import auth
from tpi.comm.base import CommError
from tpi.comm.link import Link, LinkSpec, wire_bytes
from tpi.comm.steps import Steps


def test_macs_bind_token_nonce_and_direction():
    n = auth.new_nonce()
    assert len(n) == 64 and n != auth.new_nonce()
    mac = auth.join_mac("tok", n)
    assert auth.verify(mac, auth.join_mac("tok", n))
    assert not auth.verify(mac, auth.join_mac("tok2", n))
    assert not auth.verify(mac, auth.join_mac("tok", auth.new_nonce()))
    assert not auth.verify(mac, auth.hub_proof("tok", n))   # labels differ: no reflection
    assert "tok" not in mac
    with pytest.raises(ValueError):
        auth.join_mac("", n)


@pytest.mark.parametrize("text,spec", [
    ("latency=5ms,bandwidth=300mbit,jitter=1ms", LinkSpec(0.005, 300e6, 0.001)),
    ("latency=20ms", LinkSpec(0.020)),
    (" latency = 1.5 ms , bandwidth = 1gbit ", LinkSpec(0.0015, 1e9)),
    ("latency=250us,bandwidth=10kbit", LinkSpec(250e-6, 10e3)),
    ("latency=0.1s", LinkSpec(0.1)),
])
def test_link_spec_parse(text, spec):
    got = LinkSpec.parse(text)
    assert got.latency == pytest.approx(spec.latency)
    assert got.jitter == pytest.approx(spec.jitter)
    assert (got.bandwidth or 0) == pytest.approx(spec.bandwidth or 0)


@pytest.mark.parametrize("text", ["latency=5", "latency=5ms,delay=3ms", "bandwidth=300mbps",
                                  "bandwidth=0mbit", "latency=fast", "5ms"])
def test_link_spec_rejects(text):
    with pytest.raises(ValueError):
        LinkSpec.parse(text)


def test_link_spec_none():
    assert LinkSpec.parse(None) is None and LinkSpec.parse("none") is None


def test_link_latency_pipelines():
    link = Link(LinkSpec(latency=0.05))
    # ten messages queued at once all arrive 50 ms later: latency is not per-message sleep
    assert [link.schedule(100, 1.0) for _ in range(10)] == [pytest.approx(1.05)] * 10


def test_link_bandwidth_serializes_back_to_back_messages():
    link = Link(LinkSpec(latency=0.01, bandwidth=8e6))        # 1 MB/s
    t1 = link.schedule(100_000, 0.0)
    t2 = link.schedule(100_000, 0.0)
    ser = wire_bytes(100_000) / 1e6
    assert t1 == pytest.approx(ser + 0.01)
    assert t2 == pytest.approx(2 * ser + 0.01)                 # queued behind the first
    assert link.schedule(10, 5.0) == pytest.approx(5.0 + wire_bytes(10) / 1e6 + 0.01)


def test_link_jitter_bounds():
    link = Link(LinkSpec(latency=0.01, jitter=0.002), seed=1)
    ts = [link.schedule(10, 0.0) for _ in range(1000)]
    assert min(ts) >= 0.008 - 1e-9 and max(ts) <= 0.012 + 1e-9 and len(set(ts)) > 100


def test_steps_epochs():
    s = Steps()
    assert [s.next(), s.next()] == [0, 1]
    assert s.new_epoch() == 1 << 32 and s.next() == 1 << 32
    s.kill(1, "rank 2 lost")
    with pytest.raises(CommError, match="rank 2 lost"):
        s.next()
    w = Steps(1 << 32)
    w.adopt(2 << 32)                                           # the master's next broadcast
    assert w.next() == 2 << 32
    w.adopt(1 << 32)                                           # never backwards
    assert w.next() == (2 << 32) + 1
