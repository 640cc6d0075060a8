"""`tpi master`: device 0 and the all-reduce hub. Builds the plan and the shard store, waits
for its workers, pushes each its assignment, then serves the HTTP API.

Three ways to run:
  * alone: `--devices N` shards in this process (the in-process transport);
  * with workers that know its address: `--listen HOST:PORT --devices N` (N-1 workers);
  * with a registry: `--registry redis://...`: it registers itself so workers find it,
    plans over the workers present by their measured capability, re-plans over the
    survivors when one dies mid-generation, and admits newcomers between requests.
"""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("tpi.master")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", default="127.0.0.1:8000", help="HOST:PORT of the HTTP API (default port 8000)")
    p.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--slots", type=int, default=4, help="sequences that can decode together (batching)")
    p.add_argument("--listen", default=None, help="HOST:PORT where workers connect (WebSocket hub)")
    p.add_argument("--advertise", default=None, help="HOST workers should use to reach this master (registry)")
    p.add_argument("--join-token", default=os.environ.get("TPI_JOIN_TOKEN"), help="shared secret workers must prove")
    p.add_argument("--expect-workers", type=int, default=None, help="workers to wait for (default: devices-1)")
    p.add_argument("--registry", default=os.environ.get("TPI_REGISTRY"), help="redis://[:PASSWORD@]HOST:PORT/DB")
    p.add_argument("--min-workers", type=int, default=0, help="with --registry: workers to wait for at start")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for --min-workers")
    p.add_argument("--allreduce", choices=["star", "ring", "gloo"], default="star")
    p.add_argument("--link", default=None, help='emulate a link on what the master sends, e.g. "latency=5ms"')
    p.add_argument("--wire-dtype", default=None, help="dtype of partial sums on the wire (default: compute dtype)")
    p.add_argument("--store", default=None, help="shard store directory (shared with workers); default: cache")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds an all-reduce may wait for a worker")
    p.add_argument("--tls-cert", default=os.environ.get("TPI_TLS_CERT"),
                   help="PEM certificate (chain): workers connect over wss:// (TLS)")
    p.add_argument("--tls-key", default=os.environ.get("TPI_TLS_KEY"),
                   help="PEM private key of --tls-cert (if not in the same file)")


def split_hostport(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host, int(port)


def runtime_options(args):
    from dataclasses import replace

    from tpi.cli import runtime_options as common_options

    return replace(common_options(args), num_slots=args.slots)


def build_distributed_engine(args, world_size: int, on_listening=None, membership=None, capability=None,
                             http_url: str | None = None):
    """Start the hub, wait for the workers, assign shards; returns (engine, manager)."""
    from dataclasses import replace

    from tpi.engine import build_engine, max_context, prepare_store, prepared_store
    from tpi_master.cluster_manager import ClusterManager

    if not args.join_token:
        raise SystemExit("tpi master: --join-token (or TPI_JOIN_TOKEN) is required when workers join")
    opts = runtime_options(args)
    from tpi.cli import max_block_bytes

    probe = prepared_store(args.model) or prepare_store(  # also converts the model once
        args.model, [1.0], args.dtype, root=args.store, max_block_bytes=max_block_bytes(args))
    opts = replace(opts, max_seq=max_context(probe, opts))
    host, port = split_hostport(args.listen or "0.0.0.0:29500", 29500)
    manager = ClusterManager(args, opts, host, port, membership=membership, master_capability=capability)
    manager.http_url = http_url
    if on_listening is not None:  # the hub binds in build(); tell the launcher the port first
        manager.port = port if port else _free_port(host)
        on_listening(manager.port)
    cluster = manager.build(world_size - 1, wait_timeout=args.start_timeout)
    engine = build_engine(cluster.store, cluster, opts)
    manager.engine = engine
    return engine, manager


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(args) -> int:
    from tpi.engine import build_inproc_engine
    from tpi.threads import configure_threads
    from tpi_master.http_api import serve

    log.info("computing with %d thread(s)", configure_threads())
    host, port = split_hostport(args.http, 8000)
    manager = registration = membership = None
    if args.registry:
        engine, manager, registration, membership = start_with_registry(args, port)
    else:
        workers = args.expect_workers
        if workers is None:
            workers = (args.devices - 1 if args.devices else 0) if args.listen else 0
        if workers > 0:
            engine, manager = build_distributed_engine(args, workers + 1, http_url=f"http://{host}:{port}")
        else:
            weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * (args.devices or 1)
            from tpi.cli import max_block_bytes

            engine = build_inproc_engine(args.model, weights, runtime_options(args), max_block_bytes=max_block_bytes(args))
    log.info("serving %s on http://%s:%d", engine.store.config.architecture, host, port)
    blueprints = []
    if manager is not None:  # workers that cannot see the store's volume download from here
        from tpi.shard_delivery import shard_blueprint, stores_under
        from tpi.weights.sources import cache_dir

        blueprints.append(shard_blueprint(stores_under(args.store or cache_dir() / "stores"), args.join_token))
    try:
        serve(engine, host, port, blueprints=blueprints, api_key=args.api_key, model_name=args.model or "smollm2",
              num_slots=args.slots,
              status_provider=manager.status if manager else None,
              on_cluster_failure=manager.recover if (manager and args.registry) else None,
              between_requests=manager.between_requests if manager else None)
    finally:
        engine.close()
        if manager is not None:
            manager.close()
        if membership is not None:
            membership.stop()
        if registration is not None:
            registration.stop()
    return 0


def start_with_registry(args, http_port: int):
    """Register, wait for --min-workers, plan over who is there."""
    import socket

    from tpi.capability import measure
    from tpi.membership import Membership
    from tpi.registry import register_master

    if not args.join_token:
        raise SystemExit("tpi master: --join-token (or TPI_JOIN_TOKEN) is required with --registry")
    args.listen = args.listen or "0.0.0.0:29500"
    hub_host, hub_port = split_hostport(args.listen, 29500)
    advertise = args.advertise or socket.gethostname()
    capability = measure(dtype="float32")
    registration = register_master(args.registry, args.join_token, f"{advertise}:{hub_port}", capability,
                                   http_url=f"http://{advertise}:{http_port}")
    membership = Membership(args.registry, args.join_token).start()
    if args.min_workers:
        log.info("waiting up to %.0fs for %d worker(s) to register", args.start_timeout, args.min_workers)
        membership.wait(lambda ms: len(ms) >= args.min_workers, timeout=args.start_timeout)
    present = len(membership.members())
    engine, manager = build_distributed_engine(args, present + 1, membership=membership, capability=capability,
                                               http_url=f"http://{advertise}:{http_port}")
    return engine, manager, registration, membership
