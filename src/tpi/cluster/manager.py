"""Owns the hub and the current RemoteCluster, and rebuilds both when devices come or go.

  * Recovery: when a forward fails because a worker died, `recover()` re-plans over the
    workers still connected (down to the master alone), reloads shards, swaps the engine's
    cluster, and the scheduler re-prefills prompt + tokens already produced: the client
    sees a pause, not an error.
  * Admission: with a registry, `between_requests()` re-plans when the registry's membership
    differs from the devices in the plan; it runs only while no request is active.

Each rebuild restarts the hub (its world size is fixed) on the same port; workers reconnect
on their own. Device weights come from the planner over measured capabilities when the
registry provides them, else an even split.
"""
from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from tpi.cluster.base import Cluster
from tpi.comm.base import CommError
from tpi.comm.hub import StarHub
from tpi.engine import Engine, build_runner, prepare_store_apart
from tpi.host import release_freed_memory
from tpi.weights.sources import cache_dir
from tpi.settings import MasterSettings, split_hostport
from tpi.weights.store import ShardStore
from tpi.cluster.remote import RemoteCluster

log = logging.getLogger("tpi.master.cluster")


class NoCluster(Cluster):
    """Stands in while a re-plan is under way: a step fails as a lost device does (CommError),
    so a re-plan that fails half-way sends the scheduler to recovery, not to a crash."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def forward(self, x, slots, starts, every_position=False):
        raise CommError("the cluster is being re-planned")


class ClusterManager:
    def __init__(self, settings: MasterSettings, membership=None, master_capability=None,
                 rejoin_timeout: float = 20.0):
        assert settings.hub is not None, "a cluster with workers needs hub settings"
        self.settings, self.hub_settings = settings, settings.hub
        self.opts = settings.runtime.for_source(settings.model.source)
        self.host, self.port = split_hostport(settings.hub.listen, 29500)
        # the star's data port: hub port + 1 when the user chose the port (so a firewall rule can
        # name both), any free port when the hub's port is picked for us: an ephemeral port's
        # neighbour may belong to another process
        self.data_port: int | None = 0 if self.port == 0 else None
        self.membership, self.master_capability = membership, master_capability
        self.rejoin_timeout = rejoin_timeout
        self.http_url: str | None = None       # where workers without the shared volume download shards
        self.hub: StarHub | None = None
        self.cluster: RemoteCluster | None = None
        self.engine: Engine | None = None
        self.device_names: list[str] = []       # worker names in the current plan (rank order)
        self.estimate: dict | None = None
        self.rebuilds = 0
        self._lock = threading.Lock()
        self._split_here: list[Path] = []       # stores this master split, oldest first
        self.ssl_context = None                 # wss:// when the master has a certificate
        if settings.hub.tls_cert:
            from tpi.comm.tls import server_context

            self.ssl_context = server_context(settings.hub.tls_cert, settings.hub.tls_key)

    # ---- building ---------------------------------------------------------------------

    def build(self, workers: int, wait_timeout: float | None, names: set[str] | None = None) -> RemoteCluster:
        """A new hub for `workers` workers, a plan over those that join, their shards loaded.
        names: admit only these workers (the devices re-planned for); None: any worker."""
        if self.hub is not None:
            self.hub.close()
        h = self.hub_settings
        self.hub = StarHub(workers + 1, h.join_token, self.host, self.port, allreduce=h.allreduce,
                           wire_dtype=h.wire_dtype or self.opts.torch_compute_dtype(),
                           timeout=h.timeout_s, link=h.link, ssl_context=self.ssl_context, expected_names=names,
                           data_port=self.data_port)
        self.port = self.hub.port
        log.info("hub on ws://%s:%d waiting for %d worker(s)", self.host, self.port, workers)
        self.hub.wait_for_workers(workers, timeout=wait_timeout)
        joined = self.hub.workers()
        self.device_names = [joined[r].name for r in sorted(joined)]
        self._drop_cluster()  # the old slice and KV cache go before the new ones load
        store = self._prepare_store()
        runner = build_runner(store, 0, self.opts)
        cluster = RemoteCluster(self.hub, store, runner, self.opts, http_url=self.http_url)
        cluster.ensure_assigned()
        self.cluster = cluster
        if self.engine is not None:  # the embedding rows come from the new store (an old one may go below)
            self.engine.swap_cluster(cluster, store, self.opts.torch_compute_dtype())
        release_freed_memory()  # what splitting a new store and loading the slice left behind
        log.info("cluster of %d device(s) ready: %s", workers + 1, ["master", *self.device_names])
        return cluster

    def _prepare_store(self) -> ShardStore:
        """The store for a plan over the current devices. Each plan has its own store (a
        re-plan never rewrites blocks a worker may still read); of the stores this master
        split itself, all but the current and the previous one are deleted, so measured
        (hence ever-different) plans cannot fill the volume."""
        model = self.settings.model
        root = Path(self.settings.store_root or cache_dir() / "stores")
        before = set(root.iterdir()) if root.is_dir() else set()
        store = prepare_store_apart(model.source, self._weights(), self.opts.dtype, root=root,
                                    max_block_bytes=model.max_block_bytes)
        if store.root not in before and store.root.parent == root:  # (not a store given as --model)
            self._split_here.append(store.root)
        for old in self._split_here[:-2]:
            if old != store.root:
                shutil.rmtree(old, ignore_errors=True)
                log.info("deleted the store of an earlier plan: %s", old)
        self._split_here = self._split_here[-2:]
        return store

    def _drop_cluster(self) -> None:
        """Close the current cluster and let its memory go: the engine stops pointing at it
        until the new one is in place (the scheduler calls us only between steps)."""
        if self.cluster is None:
            return
        world = self.cluster.world_size
        self.cluster.close()
        self.cluster = None
        if self.engine is not None:
            self.engine.swap_cluster(NoCluster(world))
        release_freed_memory()

    def _weights(self) -> list[float]:
        if self.membership is None or self.master_capability is None:
            weights = self.settings.model.weights
            if len(weights) == len(self.device_names) + 1:
                return list(weights)
            return [1.0] * (len(self.device_names) + 1)
        from tpi.cluster.estimate import PlannerSettings
        from tpi.cluster.planner import plan_cluster
        from tpi.weights.sources import gguf_types, model_config

        records = self.membership.members()
        caps = [self.master_capability] + [
            records[n].capability if n in records else self.master_capability for n in self.device_names]
        o = self.opts
        settings = PlannerSettings(storage_dtype=o.dtype, compute_dtype=str(o.torch_compute_dtype()).removeprefix("torch."),
                                   max_seq=o.max_seq, num_slots=o.num_slots, window_blocks=o.window,
                                   max_block_bytes=self.settings.model.max_block_bytes,
                                   gguf_types=gguf_types(self.settings.model.source) if o.dtype == "gguf" else (),
                                   gguf_exact=o.gguf_exact)
        planned = plan_cluster(model_config(self.settings.model.source), caps, None, settings)
        self.estimate = planned.estimate.to_json()
        return list(planned.weights)

    # ---- hooks for the scheduler --------------------------------------------------------

    def recover(self) -> bool:
        """A worker was lost mid-step: re-plan over the workers still connected."""
        with self._lock:
            names = [w.name for w in self.hub.workers().values()] if self.hub else []
            alive = len(names)
            # Named devices (a registry): hold their ranks for them. Unnamed: anyone may rejoin.
            survivors = set(names) if all(names) and len(set(names)) == alive else None
            log.warning("re-planning over %d surviving worker(s)", alive)
            for attempt in range(3):
                try:  # the survivors first; a newcomer waits for the next re-plan
                    self.build(alive, wait_timeout=self.rejoin_timeout, names=survivors if attempt == 0 else None)
                    self.rebuilds += 1
                    return True
                except CommError as e:
                    log.warning("rebuild attempt %d failed: %s", attempt + 1, e)
                    alive = max(0, alive - 1)  # someone else is gone too
            return False

    def between_requests(self) -> None:
        """With a registry: admit devices that joined, drop those that left."""
        if self.membership is None:
            return
        present = sorted(self.membership.members())
        if present == sorted(self.device_names) or not self.membership.healthy:
            return
        with self._lock:
            log.info("membership changed: %s -> %s; re-planning", self.device_names, present)
            try:
                self.build(len(present), wait_timeout=self.rejoin_timeout, names=set(present))
                self.rebuilds += 1
            except CommError as e:
                log.warning("re-plan failed (%s); serving with what joined", e)
                self.build(len(self.hub.workers()) if self.hub else 0, wait_timeout=5)

    def status(self) -> dict:
        return {"devices_in_plan": ["master", *self.device_names], "rebuilds": self.rebuilds,
                "estimate": self.estimate}

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        if self.hub is not None:
            self.hub.close()
