"""`tpi worker`: join a master, load the shard it assigns, run forward steps until told to stop.

A worker needs only the join token and the master's address, the registry's, or neither:
then it finds the master on the LAN (mDNS, tpi.cluster.discovery) and trusts it only once it
has proved the token in the join handshake. The master pushes the plan, the store location
and the runtime options. It sees hidden states (from which the prompt's tokens can be
recovered: README.md, workers must be trusted) and the output head's top-K candidates. It survives a lost master by reconnecting with backoff.
"""
from __future__ import annotations

import logging
import signal
import socket
import time
import uuid
from dataclasses import replace

from tpi.settings import WorkerSettings

log = logging.getLogger("tpi.worker")


def run(settings: WorkerSettings) -> int:
    from tpi.cluster.remote import serve_assignments
    from tpi.comm.base import CommError
    from tpi.comm.client import StarClient
    from tpi.comm.handshake import JoinRefused
    from tpi.host import configure_torch, release_freed_memory

    args = settings
    log.info("computing with %d thread(s)", configure_torch())
    signal.signal(signal.SIGTERM, _exit_cleanly)  # `docker stop`: deregister, do not wait for the TTL
    registration = None
    if args.registry:
        args = replace(args, name=args.name or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
        registration = register(args)
        if registration.rejected:
            log.error("the registry refused this worker: %s", registration.rejected)
            return 3
    backoff = 0.5
    discover = not args.master and registration is None  # find the master on the LAN
    tried: set[str] = set()  # masters found there that refused us or could not be reached
    while True:
        url = lan_master(tried, args.mdns_interface) if discover else (args.master or master_url(args, registration))
        if registration is not None and registration.rejected:
            log.error("the master refused this worker: %s", registration.rejected)
            return 3
        try:
            client = StarClient.connect(url, args.join_token, name=args.name, want_rank=args.rank,
                                        timeout=args.timeout_s, link=args.link, ssl_context=tls_context(args, url))
        except JoinRefused as e:
            if e.code in ("auth", "version") and discover:
                log.error("the master found on the LAN at %s refused this worker: %s; looking for another", url, e)
                tried.add(url)
                continue
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
            if discover:
                tried.add(url)  # another master on the LAN may be ours
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            continue
        backoff = 0.5
        tried.clear()
        log.info("joined %s as rank %d of %d", url, client.rank, client.world_size)
        try:
            serve_assignments(client, lambda a: open_store(a, args.join_token, args.download, url))
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


def register(args: WorkerSettings):
    """Announce this device (its measured capability) in the registry, under its name."""
    from tpi.cluster.capability import measure
    from tpi.cluster.registry import register_worker

    registration = register_worker(args.registry, args.join_token, args.name, None, measure(dtype="float32"))
    registration.wait_registered(timeout=30)
    log.info("registered as %s", args.name)
    return registration


def master_url(args, registration) -> str | None:
    """The master's hub address from the registry; None if this worker was refused."""
    from tpi.cluster.registry import RegistryTimeout, find_master

    while not registration.rejected:
        try:
            scheme = "wss" if args.tls_ca else "ws"
            return f"{scheme}://{find_master(args.registry, args.join_token, timeout=2).address}"
        except RegistryTimeout:
            continue
    return None


def lan_master(tried: set[str], interface: str | None = None) -> str:
    """Browse the LAN until a master not in `tried` answers; its hub's URL. When every master
    found was tried, try them all again after a pause (one may have been restarted with our
    token, or come back)."""
    from tpi.cluster.discovery import find_masters

    timeout = 2.0
    while True:
        found = find_masters(timeout, interface)
        fresh = [m for m in found if m.url not in tried]
        if fresh:
            log.info("found %r on the LAN at %s (mDNS: not trusted until it proves the join token)",
                     fresh[0].name, fresh[0].url)
            return fresh[0].url
        if found:
            log.warning("no master on the LAN accepted this worker (%s); looking again",
                        ", ".join(m.url for m in found))
            tried.clear()
            time.sleep(5.0)
        else:
            log.info("no master advertised on the LAN yet (mDNS service _tpi._tcp); still looking")
        timeout = min(timeout * 2, 10.0)


def open_store(assignment, token: str, download: bool = False, hub_url: str | None = None):
    """The assigned store: on the shared volume when this device sees it, else downloaded
    from the master's shard server (verified, resumable, cached by content)."""
    from tpi.weights.sources import cache_dir
    from tpi.weights.store import ShardStore, StoreError

    if not download:
        try:
            return ShardStore(assignment.store)
        except StoreError:
            if not assignment.shards_url:
                raise
    from tpi.cluster.delivery import ShardClient

    rank, shards_url = assignment.rank, reachable(assignment.shards_url, hub_url)
    log.info("store not on a shared volume here; downloading shard %d from %s", rank, shards_url)
    result = ShardClient(shards_url, token, cache_dir() / "shards").fetch(assignment.store_id, rank)
    log.info("shard %d: %d files downloaded (%d bytes), %d reused", rank, result.files_downloaded,
             result.bytes_downloaded, result.files_reused)
    return result.store


def reachable(shards_url: str, hub_url: str | None) -> str:
    """The shard server's URL with a wildcard host (a master serving on 0.0.0.0 knows no better)
    replaced by the host this worker reached the hub at."""
    from urllib.parse import urlsplit

    parts = urlsplit(shards_url)
    if hub_url is None or parts.hostname not in ("0.0.0.0", "::"):
        return shards_url
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{urlsplit(hub_url).netloc.rsplit(':', 1)[0]}{port}").geturl()
