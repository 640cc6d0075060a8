"""`tpi master`: device 0 and the all-reduce hub. Builds the plan and the shard store, waits
for its workers, pushes each its assignment, then serves the HTTP API.

Three ways to run:
  * alone: `--devices N` shards in this process (the in-process transport);
  * with workers that know its address, or find it on the LAN (it advertises its hub by
    mDNS unless --no-mdns): `--listen HOST:PORT --devices N` (N-1 workers);
  * with a registry: `--registry redis://...`: it registers itself so workers find it,
    plans over the workers present by their measured capability, re-plans over the
    survivors when one dies mid-generation, and admits newcomers between requests (at once
    when it is idle: a membership change pokes the scheduler).
"""
from __future__ import annotations

import logging

from tpi.settings import MasterSettings, split_hostport

log = logging.getLogger("tpi.master")


def run(settings: MasterSettings) -> int:
    from tpi.engine import build_inproc_engine
    from tpi.host import configure_torch
    from tpi_master.http_api import serve

    log.info("computing with %d thread(s)", configure_torch())
    host, port = split_hostport(settings.http, 8000)
    manager = registration = membership = None
    lan = []  # the hub's mDNS advertisement, once the hub has a port
    shards = None  # workers that cannot see the store's volume download from here
    if settings.hub is not None:
        from tpi.weights.sources import cache_dir
        from tpi_master.shard_server import serving_while_starting, shard_blueprint, stores_under

        shards = shard_blueprint(stores_under(settings.store_root or cache_dir() / "stores"), settings.hub.join_token)
    try:
        if settings.registry:
            from tpi.cluster.launch import start_with_registry

            with serving_while_starting(shards, host, port):
                engine, manager, registration, membership = start_with_registry(settings, port)
        elif settings.hub is not None:
            from tpi.cluster.launch import start_distributed

            with serving_while_starting(shards, host, port):
                engine, manager = start_distributed(
                    settings, settings.expect_workers + 1, http_url=f"http://{host}:{port}",
                    on_listening=(lambda p: lan.append(advertise(settings, p))) if settings.mdns else None)
        else:
            engine = build_inproc_engine(settings.model, settings.runtime)
    except BaseException:
        for a in filter(None, lan):
            a.close()
        raise
    from tpi.generation.draft import attach_drafter

    attach_drafter(engine, settings.draft, settings.runtime)
    log.info("serving %s on http://%s:%d (draft: %s, %d tokens)", engine.store.config.architecture, host, port,
             settings.draft.drafter, settings.draft.tokens)
    try:
        serve(engine, host, port, blueprints=[shards] if shards else [], api_key=settings.api_key,
              model_name=settings.model.name,
              num_slots=settings.runtime.num_slots,
              status_provider=manager.status if manager else None,
              on_cluster_failure=manager.recover if (manager and settings.registry) else None,
              between_requests=manager.between_requests if manager else None,
              poke_on=(lambda poke: membership.add_listener(lambda change: poke())) if membership else None)
    finally:
        engine.close()
        if manager is not None:
            manager.close()
        if membership is not None:
            membership.stop()
        if registration is not None:
            registration.stop()
        for a in filter(None, lan):
            a.close()
    return 0


def advertise(settings: MasterSettings, hub_port: int):
    """Announce the hub on the LAN (tpi.cluster.discovery) at --advertise, else at the --listen
    host, else at every address of this machine. None if it cannot: workers given the
    address still join, so that is a warning, not a failure."""
    from tpi.cluster.discovery import Advertisement

    listen_host, _ = split_hostport(settings.hub.listen, 29500)
    host = settings.advertise or (None if listen_host in ("", "0.0.0.0", "::") else listen_host)
    try:
        return Advertisement(hub_port, tls=bool(settings.hub.tls_cert), host=host)
    except (OSError, ValueError) as e:
        log.warning("cannot advertise the hub on the LAN (%s); workers need --master", e)
        return None
