"""The netem sidecar's decisions (services/netem/sidecar.py), without Docker: who emulates
which part of EDGE_LINK on a kernel with and without netem. The e2e test sees only the
no-netem case (the CI kernel has none); this covers both."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("docker")
_spec = importlib.util.spec_from_file_location(
    "tpi_netem_sidecar", Path(__file__).resolve().parents[2] / "services" / "netem" / "sidecar.py")
sidecar = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sidecar  # dataclasses look their module up there
_spec.loader.exec_module(sidecar)
from tpi.comm.hub import StarHub  # noqa: E402 - after the sidecar's module is set up
from tpi.comm.link import LinkSpec as Link  # noqa: E402
decide, transport_link, parse = sidecar.decide, sidecar.transport_link, sidecar.parse_link

EDGE = parse("latency=5ms,bandwidth=300mbit,jitter=1ms,loss=0.5%")
OWN = parse("latency=5ms,bandwidth=300mbit,jitter=1ms")


def test_parse():
    assert EDGE == Link(latency=0.005, jitter=0.001, bandwidth=300e6, loss=0.5)
    assert parse("none") == Link() == parse("")
    assert parse("loss=0").loss == 0
    assert parse("rate=1mbit") == Link(bandwidth=1e6)
    for bad in ("latency=5", "bandwidth=0mbit", "loss=200%", "delay=5ms", "latency"):
        with pytest.raises(ValueError):
            parse(bad)


SPECS = ["latency=5ms,bandwidth=300mbit,jitter=1ms,loss=0", "latency=5ms,loss=0.5%",
         "rate=10mbit", "latency=5", "loss=200%", "delay=5ms", "bandwidth=0mbit", "none"]


@pytest.mark.parametrize("spec", SPECS)
def test_the_transport_and_the_sidecar_accept_the_same_specs(spec):
    """A spec the appliance's EDGE_LINK may hold starts a real hub (the transport) exactly
    when the sidecar accepts it, and both read the same link."""
    try:
        expected = parse(spec)
    except ValueError:
        expected = None
    try:
        with StarHub(1, "test-join-token-long-enough", link=spec) as hub:
            got = hub.link or Link()
    except ValueError:
        got = None
    assert got == expected


def test_transport_link_is_read_from_the_command_line():
    assert transport_link(["worker", "--link=latency=5ms"]) == Link(latency=0.005)
    assert transport_link(["worker", "--link", "latency=2ms"]) == Link(latency=0.002)
    assert transport_link(["worker", "--link=none"]) == Link()
    assert transport_link(["worker"]) == Link()


def test_without_netem_the_rate_is_tbf_and_the_transport_keeps_the_delay():
    d = decide(EDGE, OWN, netem=False)
    assert d.qdisc[:3] == ["tbf", "rate", "300000kbit"]
    assert d.kernel == {"rate_bps": 300e6, "qdisc": "tbf"}
    assert d.transport["latency_s"] == 0.005
    assert d.missing == ["loss 0.5%: the kernel has no netem"]


def test_without_netem_a_delay_nobody_emulates_is_reported():
    d = decide(EDGE, Link(), netem=False)
    assert any(m.startswith("delay 5ms") for m in d.missing), d.missing


def test_with_netem_the_kernel_adds_loss_and_rate_but_never_a_second_delay():
    d = decide(EDGE, OWN, netem=True)
    assert d.qdisc == ["netem", "loss", "0.5%", "rate", "300000kbit"]
    assert not d.missing


def test_with_netem_a_process_without_link_gets_the_delay_in_the_kernel():
    d = decide(EDGE, Link(), netem=True)
    assert d.qdisc == ["netem", "delay", "5ms", "1ms", "loss", "0.5%", "rate", "300000kbit", "limit", "10000"]
    assert d.kernel["latency_s"] == 0.005 and not d.missing


def test_no_link_clears_the_qdisc():
    assert decide(Link(), Link(), netem=True).qdisc == []
    assert decide(Link(), Link(), netem=False).qdisc == []
