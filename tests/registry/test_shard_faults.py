"""The shard client against a hostile or broken HTTP server (a real socket, the real
manifest signed with the token) and its cache's pruning: a file never takes more than the
manifest's size, a malformed Content-Range is a clear error, old plans' files go."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tpi.cluster.delivery import MAC_HEADER, NONCE_HEADER, DeliveryError, ShardClient, manifest_mac
from tpi.weights.store import MANIFEST, ShardStore

from test_shard_delivery import TOKEN, server, stores  # noqa: F401  (fixtures)

FLOOD_CAP = 64 << 20   # the hostile server stops here (so a client without a cap still ends)


def hostile(root: Path, mode: str):
    """A server for store-a: the real manifest, properly signed; files sent per `mode`:
    "flood": the file, then zeros until the client hangs up; "badrange": the first answer
    cut halfway, then every Range request answered 206 with a garbled Content-Range."""
    store = root / "store-a"
    manifest = (store / MANIFEST).read_bytes()
    seen: set[str] = set()
    stats = {"sent": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path.endswith("/manifest"):
                mac = manifest_mac(TOKEN, "store-a", self.headers[NONCE_HEADER], manifest)
                return self.reply(200, manifest, {MAC_HEADER: mac, "Content-Length": str(len(manifest))})
            data = (store / self.path.split("/files/", 1)[1]).read_bytes()
            if mode == "flood":
                self.reply(200, data, {"Connection": "close"})
                zeros, sent = bytes(1 << 20), 0
                try:
                    while sent < FLOOD_CAP:
                        self.wfile.write(zeros)
                        sent += len(zeros)
                        stats["sent"] += len(zeros)
                except OSError:
                    pass  # the client hung up: what a capped client does
                return None
            if self.headers.get("Range") and self.path in seen:
                return self.reply(206, data[len(data) // 2:], {"Content-Range": "bytes lots-of/them",
                                                               "Content-Length": str(len(data) - len(data) // 2)})
            seen.add(self.path)
            self.reply(200, data[: len(data) // 2], {"Content-Length": str(len(data)), "Connection": "close"})
            return None

        def reply(self, status: int, body: bytes, headers: dict) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, stats


def test_a_file_never_takes_more_than_the_manifest_says(stores, tmp_path):  # noqa: F811
    httpd, stats = hostile(stores, "flood")
    try:
        client = ShardClient(f"http://127.0.0.1:{httpd.server_port}", TOKEN, tmp_path / "cache", attempts=2)
        result = client.fetch("store-a", 1)
    finally:
        httpd.shutdown()
    want = ShardStore(stores / "store-a")
    expected = sum(want.file_bytes(rel) for rel in want.block_files(1))
    assert result.bytes_downloaded == expected  # not a byte of the flood kept
    assert result.store.load_block(1, 0, "attn")
    assert stats["sent"] < result.files_downloaded * FLOOD_CAP  # the client hung up on the flood
    assert not list((tmp_path / "cache" / "partial").iterdir())


def test_a_malformed_content_range_is_a_clear_error(stores, tmp_path):  # noqa: F811
    httpd, _ = hostile(stores, "badrange")
    try:
        client = ShardClient(f"http://127.0.0.1:{httpd.server_port}", TOKEN, tmp_path / "cache", attempts=2)
        with pytest.raises(DeliveryError, match="malformed Content-Range 'bytes lots-of/them'"):
            client.fetch("store-a", 1)
    finally:
        httpd.shutdown()


def test_the_cache_keeps_the_last_two_plans_only(server, stores, tmp_path):  # noqa: F811
    url, _ = server()
    cache = tmp_path / "cache"
    client = ShardClient(url, TOKEN, cache)
    stale = cache / "partial" / ("ab" * 32 + ".part")
    stale.write_bytes(b"half a file from a plan long gone")
    first = client.fetch("store-a", 0)
    first_only = {p.name for p in (cache / "sha256").iterdir()}
    second = client.fetch("store-b", 0)
    third = client.fetch("store-a", 2)
    assert not stale.exists()
    assert not first.store.root.exists()                   # the oldest plan's store went
    assert second.store.root.exists() and third.store.root.exists()
    kept = {p.name for p in (cache / "sha256").iterdir()}
    used = {second.store.files[r].sha256 for r in second.store.block_files(0)} | \
           {third.store.files[r].sha256 for r in third.store.block_files(2)}
    assert kept == used and first_only - used and not (first_only - used) & kept
    assert second.store.load_block(0, 0, "mlp") and third.store.load_block(2, 0, "attn")
