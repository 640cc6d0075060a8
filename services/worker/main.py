"""`tpi worker`: join a master, load the shard it assigns, run forward steps until told to stop.

A worker needs only the master's address (or the registry's) and the join token; the
master pushes the plan, the store location and the runtime options. It sees hidden states,
never prompts or token ids. It survives a lost master by reconnecting with backoff.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import time
import uuid

log = logging.getLogger("tpi.worker")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", required=False, help="ws://HOST:PORT of the master's hub")
    p.add_argument("--registry", default=os.environ.get("TPI_REGISTRY"),
                   help="redis://[:PASSWORD@]HOST:PORT/DB: find the master there and register this device")
    p.add_argument("--join-token", default=os.environ.get("TPI_JOIN_TOKEN"), help="the cluster's shared join token")
    p.add_argument("--link", default=None, help='emulate a link, e.g. "latency=5ms,bandwidth=300mbit"')
    p.add_argument("--name", default="", help="a name for logs and the cluster panel")
    p.add_argument("--rank", type=int, default=None, help="ask for this rank")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds a collective may wait")
    p.add_argument("--tls-ca", default=os.environ.get("TPI_TLS_CA"),
                   help="PEM file to trust for the master's certificate (a private CA or the master's "
                        "self-signed one); implies wss://. Without it, wss:// URLs use the system's CAs")
    p.add_argument("--once", action="store_true", help="exit when the master goes away")
    p.add_argument("--download", action="store_true",
                   help="always fetch shards from the master over HTTP, even if the store path is visible")


def run(args) -> int:
    from tpi.comm.base import CommError
    from tpi.comm.client import StarClient
    from tpi.comm.handshake import JoinRefused
    from tpi.memory import release_freed_memory

    from tpi.threads import configure_threads

    if not args.join_token:
        raise SystemExit("tpi worker: --join-token (or TPI_JOIN_TOKEN) is required")
    if not args.master and not args.registry:
        raise SystemExit("tpi worker: give --master ws://HOST:PORT or --registry redis://...")
    log.info("computing with %d thread(s)", configure_threads())
    signal.signal(signal.SIGTERM, _exit_cleanly)  # `docker stop`: deregister, do not wait for the TTL
    registration = None
    if args.registry:
        registration = register(args)
        if registration.rejected:
            log.error("the registry refused this worker: %s", registration.rejected)
            return 3
    backoff = 0.5
    while True:
        url = args.master or master_url(args, registration)
        if registration is not None and registration.rejected:
            log.error("the master refused this worker: %s", registration.rejected)
            return 3
        try:
            client = StarClient.connect(url, args.join_token, name=args.name, want_rank=args.rank,
                                        timeout=args.timeout, link=args.link, ssl_context=tls_context(args, url))
        except JoinRefused as e:
            if e.code in ("auth", "version"):
                log.error("the master refused this worker: %s", e)
                return 3
            # e.g. "full": the master planned without us; it admits us at its next re-plan
            log.info("not admitted yet (%s); retrying in %.1fs", e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        except (CommError, OSError) as e:
            log.warning("cannot reach the master at %s (%s); retrying in %.1fs", url, e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            continue
        backoff = 0.5
        log.info("joined %s as rank %d of %d", url, client.rank, client.world_size)
        try:
            serve(client, args.join_token, args.download)
        except CommError as e:
            log.warning("lost the master: %s", e)
        finally:
            client.close()
            release_freed_memory()  # the shard of the plan that ended
        if args.once:
            return 0


def tls_context(args, url: str):
    """The client TLS context for a wss:// master (verified against --tls-ca, else the system's
    CAs); None for ws://. A CA given for a ws:// URL is a mistake worth stopping for."""
    from tpi.comm.tls import client_context

    if url.startswith("wss://"):
        return client_context(args.tls_ca)
    if args.tls_ca:
        raise SystemExit(f"tpi worker: --tls-ca given but the master URL {url} is not wss://")
    return None


def _exit_cleanly(signum, frame) -> None:
    """SIGTERM unwinds like a normal exit: the connection closes and the registration's
    exit hook deletes this worker's record, so the master re-plans without waiting."""
    log.info("stopping (signal %d)", signum)
    raise SystemExit(0)


def register(args):
    """Announce this device (its measured capability) in the registry, under a stable name."""
    from tpi.capability import measure
    from tpi.registry import register_worker

    args.name = args.name or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    registration = register_worker(args.registry, args.join_token, args.name, None, measure(dtype="float32"))
    registration.wait_registered(timeout=30)
    log.info("registered as %s", args.name)
    return registration


def master_url(args, registration) -> str | None:
    """The master's hub address from the registry; None if this worker was refused."""
    from tpi.registry import RegistryTimeout, find_master

    while not registration.rejected:
        try:
            scheme = "wss" if args.tls_ca else "ws"
            return f"{scheme}://{find_master(args.registry, args.join_token, timeout=2).address}"
        except RegistryTimeout:
            continue
    return None


def open_store(plan: dict, rank: int, token: str, download: bool = False):
    """The assigned store: on the shared volume when this device sees it, else downloaded
    from the master's shard server (verified, resumable, cached by content)."""
    from tpi.weights.sources import cache_dir
    from tpi.weights.store import ShardStore, StoreError

    if not download:
        try:
            return ShardStore(plan["store"])
        except StoreError:
            if not plan.get("shards_url"):
                raise
    from tpi.shard_delivery import ShardClient

    log.info("store not on a shared volume here; downloading shard %d from %s", rank, plan["shards_url"])
    result = ShardClient(plan["shards_url"], token, cache_dir() / "shards").fetch(plan["store_id"], rank)
    log.info("shard %d: %d files downloaded (%d bytes), %d reused", rank, result.files_downloaded,
             result.bytes_downloaded, result.files_reused)
    return result.store


def serve(client, token: str, download: bool = False) -> None:
    """Answer the master's control messages until Shutdown or a lost connection."""
    from tpi.comm.base import CommError
    from tpi.engine import RuntimeOptions, build_runner
    from tpi.memory import peak_rss_bytes, release_freed_memory, rss_bytes
    from tpi.protocol import Assignment, ForwardStep, Reply, ResetCache, Shutdown
    runner = comm = None
    while True:
        msg = client.recv_control()
        if isinstance(msg, Shutdown):
            log.info("master asked to stop: %s", msg.reason)
            return
        if isinstance(msg, Assignment):
            try:
                store = open_store(msg.plan, msg.rank, token, download)
                opts = RuntimeOptions(**msg.plan["options"])
                if runner is not None:  # the old slice and KV cache go before the new ones load
                    runner.blocks.close()
                    runner = None
                    release_freed_memory()
                runner = build_runner(store, msg.rank, opts)
                comm = client.communicator()
                detail = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
                client.send(Reply(seq=-1, ok=True, detail=json.dumps(detail)))
                log.info("loaded shard %d of %d from %s", msg.rank, msg.world_size, store.root)
            except Exception as e:  # a bad store or options: tell the master, stay up
                log.error("cannot load the assigned shard: %s", e)
                runner = None
                client.send(Reply(seq=-1, ok=False, detail=str(e)))
        elif isinstance(msg, ForwardStep):
            if runner is None:
                client.send(Reply(seq=msg.seq, ok=False, detail="no shard loaded"))
                continue
            try:
                runner.step(msg.hidden, comm, msg.slots, msg.starts, msg.every_position)
            except CommError as e:
                log.warning("step %d failed: %s", msg.seq, e)
                continue
            except Exception as e:  # a shard error (e.g. a corrupt block): report, stay up
                log.error("step %d failed: %s", msg.seq, e)
                client.send(Reply(seq=msg.seq, ok=False, detail=str(e)))
                continue
            detail = {"breakdown": runner.last.to_json(), "rss_bytes": rss_bytes(),
                      "peak_rss_bytes": peak_rss_bytes()}
            client.send(Reply(seq=msg.seq, ok=True, detail=json.dumps(detail)))
        elif isinstance(msg, ResetCache):
            pass  # caches are overwritten position by position; nothing to free
