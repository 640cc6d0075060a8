"""The master's shard server: a Flask blueprint that serves shard stores to workers that
do not see the shared volume. The protocol, its authentication and the client are described
in tpi.cluster.delivery."""
from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping

from tpi.comm import auth
from tpi.cluster.delivery import (MAC_HEADER, NONCE_HEADER, NONCE_RE, STORE_ID_RE, bearer,
                                  manifest_mac)
from tpi.weights.store import MANIFEST

log = logging.getLogger("tpi.shards")


def stores_under(root: str | Path) -> Callable[[str], Path | None]:
    """A store lookup for `shard_blueprint`: store id = a directory directly under `root`."""
    root = Path(root).resolve()

    def lookup(store_id: str) -> Path | None:
        path = (root / store_id).resolve()
        if path.parent != root or not (path / MANIFEST).is_file():
            return None
        return path

    return lookup


def shard_blueprint(stores: Mapping[str, str | Path] | Callable[[str], Path | None], token: str,
                    url_prefix: str = "/shards"):
    """A Flask blueprint serving the stores; `stores` maps a store id to its directory
    (a dict, or a function such as `stores_under(root)`)."""
    from flask import Blueprint, Response, abort, request, send_file

    bearer(token, "")  # refuses an empty token at mount time
    lookup = stores.get if isinstance(stores, Mapping) else stores
    bp = Blueprint("tpi_shards", __name__, url_prefix=url_prefix)
    manifests: dict[Path, tuple[int, bytes, dict]] = {}

    def open_store(store_id: str) -> tuple[Path, bytes, dict]:
        if not STORE_ID_RE.match(store_id):
            abort(404)
        got = request.headers.get("Authorization", "")
        if not auth.verify(f"Bearer {bearer(token, store_id)}", got):
            log.warning("shards: refused %s %s from %s (bad or missing bearer)",
                        request.method, request.path, request.remote_addr)
            abort(Response("join-token proof missing or wrong\n", 401,
                           {"WWW-Authenticate": 'Bearer realm="tpi-shards"'}))
        root = lookup(store_id)
        if root is None:
            abort(404)
        root = Path(root)
        mpath = root / MANIFEST
        try:
            mtime = mpath.stat().st_mtime_ns
        except FileNotFoundError:
            abort(404)
        cached = manifests.get(root)
        if cached is None or cached[0] != mtime:
            body = mpath.read_bytes()
            cached = manifests[root] = (mtime, body, json.loads(body))
        return root, cached[1], cached[2]

    @bp.get("/<store_id>/manifest")
    def manifest(store_id: str):
        _, body, _ = open_store(store_id)
        nonce = request.headers.get(NONCE_HEADER, "")
        if not NONCE_RE.match(nonce):
            abort(Response(f"{NONCE_HEADER} must be 32-128 lowercase hex digits\n", 400))
        return Response(body, 200, {MAC_HEADER: manifest_mac(token, store_id, nonce, body),
                                    "Content-Type": "application/json", "Cache-Control": "no-store"})

    @bp.get("/<store_id>/files/<path:rel>")
    def file(store_id: str, rel: str):
        root, _, m = open_store(store_id)
        entry = m.get("files", {}).get(rel)
        if entry is None:  # only files the manifest lists: no path reaches outside the store
            abort(404)
        path = (root / rel).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            abort(404)
        # send_file answers Range and If-Range (with the sha256 as a strong ETag) itself.
        return send_file(path, mimetype="application/octet-stream", etag=entry["sha256"],
                         conditional=True, max_age=0)

    return bp


@contextmanager
def serving_while_starting(blueprint, host: str, port: int):
    """The shard server alone on the API's address while the cluster starts. The API needs the
    engine, which needs every worker's shard loaded, and a worker that does not see the store's
    volume (a device on the LAN) downloads its shard first: without this it never could.
    Meanwhile /healthz answers 503 "starting"."""
    from flask import Flask

    from tpi.wsgi import make_server

    app = Flask("tpi-shards")
    app.register_blueprint(blueprint)
    app.get("/healthz")(lambda: ({"status": "starting"}, 503))
    server = make_server(app, host, port)
    thread = threading.Thread(target=server.serve_forever, name="tpi-shards-early", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        thread.join(10)
