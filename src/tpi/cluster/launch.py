"""Bring a cluster with workers up: the hub, the workers' shards, the engine on top.

  start_distributed    a master's engine over workers that join its hub (`tpi master --listen`)
  start_with_registry  the same, registered in a registry, planned over who is there
  LocalCluster         `tpi generate --transport ws`: a master in this process and N-1 worker
                       processes on loopback, for one generation
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import replace

from tpi.host import configure_torch
from tpi.protocol import Shutdown
from tpi.settings import HubSettings, MasterSettings, ModelSettings, RuntimeOptions, split_hostport

log = logging.getLogger("tpi.master")


def start_distributed(settings: MasterSettings, world_size: int, on_listening=None, membership=None,
                      capability=None, http_url: str | None = None):
    """Start the hub, wait for the workers, assign shards; returns (engine, manager).
    `on_listening(port)` is called once the hub's port is known (before workers are awaited)."""
    from tpi.cluster.manager import ClusterManager
    from tpi.engine import build_engine, prepared_store
    from tpi.weights.sources import model_config

    store = prepared_store(settings.model.source)   # nothing is split here (see prepare_store_apart)
    config = store.config if store is not None else model_config(settings.model.source)
    context = min(settings.runtime.max_seq, config.max_position_embeddings)
    settings = replace(settings, runtime=replace(settings.runtime, max_seq=context))
    manager = ClusterManager(settings, membership=membership, master_capability=capability)
    manager.http_url = http_url
    if on_listening is not None:  # the hub binds in build(); tell the launcher the port first
        manager.port = manager.port or _free_port(manager.host)
        on_listening(manager.port)
    try:
        cluster = manager.build(world_size - 1, wait_timeout=settings.hub.start_timeout_s)
        engine = build_engine(cluster.store, cluster, settings.runtime)
    except BaseException:
        manager.close()  # the hub's ports go with the failed start
        raise
    manager.engine = engine
    return engine, manager


def start_with_registry(settings: MasterSettings, http_port: int):
    """Register, wait for the minimum of workers, plan over who is there;
    returns (engine, manager, registration, membership)."""
    from tpi.cluster.capability import measure
    from tpi.cluster.membership import Membership
    from tpi.cluster.registry import register_master

    token = settings.hub.join_token
    _, hub_port = split_hostport(settings.hub.listen, 29500)
    advertise = settings.advertise or socket.gethostname()
    capability = measure(dtype="float32")
    registration = register_master(settings.registry, token, f"{advertise}:{hub_port}", capability,
                                   http_url=f"http://{advertise}:{http_port}")
    membership = Membership(settings.registry, token).start()
    if settings.min_workers:
        log.info("waiting up to %.0fs for %d worker(s) to register", settings.hub.start_timeout_s,
                 settings.min_workers)
        membership.wait(lambda ms: len(ms) >= settings.min_workers, timeout=settings.hub.start_timeout_s)
    present = len(membership.members())
    engine, manager = start_distributed(settings, present + 1, membership=membership, capability=capability,
                                        http_url=f"http://{advertise}:{http_port}")
    return engine, manager, registration, membership


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalCluster:
    """Context manager: a real master (hub + engine) with `devices - 1` worker subprocesses."""

    def __init__(self, model: ModelSettings, runtime: RuntimeOptions, *, allreduce: str = "star",
                 link: str | None = None, wire_dtype: str | None = None):
        token = secrets.token_hex(16)
        self.settings = MasterSettings(
            model=model, runtime=replace(runtime, num_slots=1),
            hub=HubSettings(join_token=token, listen="127.0.0.1:0", allreduce=allreduce, link=link,
                            wire_dtype=wire_dtype, timeout_s=10.0))
        self.procs: list[subprocess.Popen] = []
        self.port: int | None = None            # the hub's, once picked
        self.engine = self.manager = None

    def __enter__(self):
        devices, hub = self.settings.model.devices, self.settings.hub
        threads = configure_torch(share_of_machine=devices)

        def spawn_workers(port: int) -> None:
            self.port = port
            for rank in range(1, devices):
                cmd = [sys.executable, "-m", "tpi_cli", "worker", "--master", f"ws://127.0.0.1:{port}",
                       "--join-token", hub.join_token, "--rank", str(rank), "--name", f"local-{rank}", "--once"]
                if hub.link:
                    cmd += ["--link", hub.link]
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # share the cores
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env))

        try:
            self.engine, self.manager = start_distributed(self.settings, devices, on_listening=spawn_workers)
        except BaseException:
            for p in self.procs:  # no worker outlives a failed start (it would hold our stderr open)
                p.kill()
                p.wait()
            raise
        return self.engine

    def __exit__(self, *exc):
        if self.manager is not None:
            try:
                self.manager.hub.broadcast(Shutdown(reason="generation done"))
            except Exception:  # noqa: BLE001 - workers may be gone already
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.engine is not None:
            self.engine.close()
        if self.manager is not None:
            self.manager.close()
