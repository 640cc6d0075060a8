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
Link, decide, transport_link = sidecar.Link, sidecar.decide, sidecar.transport_link

EDGE = Link.parse("latency=5ms,bandwidth=300mbit,jitter=1ms,loss=0.5%")
OWN = Link.parse("latency=5ms,bandwidth=300mbit,jitter=1ms")


def test_parse():
    assert EDGE == Link(latency_s=0.005, jitter_s=0.001, rate_bps=300e6, loss_pct=0.5)
    assert Link.parse("none") == Link() == Link.parse("")
    assert Link.parse("loss=0").loss_pct == 0
    for bad in ("latency=5", "bandwidth=0mbit", "loss=200%", "delay=5ms", "latency"):
        with pytest.raises(ValueError):
            Link.parse(bad)


def test_transport_link_is_read_from_the_command_line():
    assert transport_link(["worker", "--link=latency=5ms"]) == Link(latency_s=0.005)
    assert transport_link(["worker", "--link", "latency=2ms"]) == Link(latency_s=0.002)
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
