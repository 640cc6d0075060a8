"""`tpi master`: build the engine (own shard + workers' shards) and serve the HTTP API."""
from __future__ import annotations

import argparse
import logging

from tpi.engine import RuntimeOptions, build_inproc_engine

log = logging.getLogger("tpi.master")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", default="127.0.0.1:8000", help="HOST:PORT of the HTTP API (default port 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--slots", type=int, default=4, help="sequences that can decode together (batching)")


def split_hostport(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host, int(port)


def run(args) -> int:
    from tpi_master.http_api import serve

    opts = RuntimeOptions(dtype=args.dtype, compute_dtype=args.compute_dtype, max_seq=args.max_seq,
                          num_slots=args.slots)
    weights = [1.0] * (args.devices or 1)
    engine = build_inproc_engine(args.model, weights, opts)
    host, port = split_hostport(args.http, 8000)
    log.info("serving %s on http://%s:%d", engine.store.config.architecture, host, port)
    try:
        serve(engine, host, port, api_key=args.api_key, model_name=args.model or "smollm2")
    finally:
        engine.close()
    return 0
