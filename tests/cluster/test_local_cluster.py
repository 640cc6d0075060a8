"""`tpi generate --transport ws`'s cluster (LocalCluster): real worker processes on loopback."""
from __future__ import annotations

import socket

import pytest

from procs import free_port
from tpi.cluster import launch
from tpi.cluster.launch import LocalCluster
from tpi.cluster.manager import ClusterManager
from tpi.settings import ModelSettings, RuntimeOptions


def local_cluster(source) -> LocalCluster:
    return LocalCluster(ModelSettings(source=str(source), weights=(1, 1, 1)), RuntimeOptions(dtype="float32"))


def test_failed_start_leaves_no_worker_and_no_port(monkeypatch, smollm2_dir):
    """A start that fails once the workers run (here: the store cannot be prepared) reaps them
    and closes the hub: a worker left behind kept the caller's stderr open, so `tpi generate`
    hung instead of exiting with its error (a clean CI run waited 600 s on it)."""
    def fail(self):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ClusterManager, "_prepare_store", fail)
    local = local_cluster(smollm2_dir)
    with pytest.raises(OSError, match="injected"):
        local.__enter__()
    assert len(local.procs) == 2
    assert all(p.poll() is not None for p in local.procs), "a worker outlived the failed start"
    with socket.socket() as s:  # the hub no longer listens (SO_REUSEADDR, as servers bind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", local.port))


def test_picked_hub_port_does_not_claim_its_neighbour(monkeypatch, smollm2_dir):
    """When the hub's port is picked for it, the data plane takes any free port: port + 1 of
    an ephemeral port may belong to another process. Here it does: we hold it."""
    port = free_port()  # p with p + 1 free; we take p + 1
    with socket.socket() as neighbour:
        neighbour.bind(("127.0.0.1", port + 1))
        neighbour.listen()
        monkeypatch.setattr(launch, "_free_port", lambda host: port)
        with local_cluster(smollm2_dir) as engine:
            assert engine.cluster.hub.port == port
            assert engine.cluster.hub.data_port not in (0, port + 1)
