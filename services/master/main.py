"""`tpi master`: device 0 and the all-reduce hub. Builds the plan and the shard store, waits
for its workers, pushes each its assignment, then serves the HTTP API.

With no workers expected (`--expect-workers 0`, the default without `--listen`), the master
runs `--devices N` shards in its own process (the in-process transport)."""
from __future__ import annotations

import argparse
import logging
import os

from tpi.engine import RuntimeOptions

log = logging.getLogger("tpi.master")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", default="127.0.0.1:8000", help="HOST:PORT of the HTTP API (default port 8000)")
    p.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--slots", type=int, default=4, help="sequences that can decode together (batching)")
    p.add_argument("--listen", default=None, help="HOST:PORT where workers connect (WebSocket hub)")
    p.add_argument("--join-token", default=os.environ.get("TPI_JOIN_TOKEN"), help="shared secret workers must prove")
    p.add_argument("--expect-workers", type=int, default=None, help="workers to wait for (default: devices-1)")
    p.add_argument("--allreduce", choices=["star", "ring", "gloo"], default="star")
    p.add_argument("--link", default=None, help='emulate a link on what the master sends, e.g. "latency=5ms"')
    p.add_argument("--wire-dtype", default=None, help="dtype of partial sums on the wire (default: compute dtype)")
    p.add_argument("--store", default=None, help="shard store directory (shared with workers); default: cache")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds an all-reduce may wait for a worker")


def split_hostport(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host, int(port)


def runtime_options(args) -> RuntimeOptions:
    from dataclasses import replace

    from tpi.cli import runtime_options as common_options

    return replace(common_options(args), num_slots=args.slots)


def build_distributed_engine(args, world_size: int, on_listening=None):
    """Start the hub, wait for the workers, assign shards; returns (engine, hub)."""
    from dataclasses import asdict

    from tpi.comm.hub import StarHub
    from tpi.engine import build_engine, build_runner, max_context, prepare_store
    from tpi_master.remote_cluster import RemoteCluster

    if not args.join_token:
        raise SystemExit("tpi master: --join-token (or TPI_JOIN_TOKEN) is required when workers join")
    opts = runtime_options(args)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * world_size
    store = prepare_store(args.model, weights, args.dtype, args.store)
    opts = RuntimeOptions(**{**asdict(opts), "max_seq": max_context(store, opts)})
    host, port = split_hostport(args.listen or "0.0.0.0:29500", 29500)
    hub = StarHub(world_size, args.join_token, host, port, allreduce=args.allreduce,
                  wire_dtype=args.wire_dtype or opts.torch_compute_dtype(), timeout=args.timeout,
                  link=args.link)
    log.info("hub listening on ws://%s:%d for %d worker(s)", host, hub.port, world_size - 1)
    if on_listening is not None:
        on_listening(hub.port)
    hub.wait_for_workers(world_size - 1, timeout=None)
    runner = build_runner(store, 0, opts)
    cluster = RemoteCluster(hub, store, runner, asdict(opts))
    cluster.ensure_assigned()
    return build_engine(store, cluster, opts), hub


def run(args) -> int:
    from tpi.engine import build_inproc_engine
    from tpi_master.http_api import serve

    from tpi.threads import configure_threads

    log.info("computing with %d thread(s)", configure_threads())
    workers = args.expect_workers
    if workers is None:
        workers = (args.devices - 1 if args.devices else 0) if args.listen else 0
    hub = None
    if workers > 0:
        engine, hub = build_distributed_engine(args, workers + 1)
    else:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * (args.devices or 1)
        engine = build_inproc_engine(args.model, weights, runtime_options(args))
    host, port = split_hostport(args.http, 8000)
    log.info("serving %s on http://%s:%d", engine.store.config.architecture, host, port)
    try:
        serve(engine, host, port, api_key=args.api_key, model_name=args.model or "smollm2")
    finally:
        engine.close()
        if hub is not None:
            hub.close()
    return 0
