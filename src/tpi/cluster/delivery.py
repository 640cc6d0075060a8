"""Shard files over HTTP, from the master to a worker that does not see the shared volume.

Server (mounted by the master, Flask: services/master/shard_server.py):
    GET /shards/<store-id>/manifest        the store's manifest.json
    GET /shards/<store-id>/files/<path>    one file the manifest lists (Range requests work)

Authentication, derived from the join token so the token itself never travels:
  * client -> server: `Authorization: Bearer HMAC-SHA256(token, BEARER_LABEL + store-id)`.
    The bearer opens one store's files and nothing else (not the cluster: joining uses
    other labels). Without TLS an eavesdropper could replay it, but would only get the
    same bytes it can already watch being transferred.
  * server -> client: the manifest response carries
    `X-TPI-Manifest-MAC: HMAC-SHA256(token, MANIFEST_LABEL + store-id + nonce + sha256(body))`
    for the client's fresh `X-TPI-Nonce`. Every file is then checked against the manifest's
    sha256, so the whole delivery is authenticated end to end even over plain HTTP.

Paths cannot escape the store: a file is served only if its path is a key of the manifest's
`files`, and the store id must name a directory directly under the configured root.

Client: files are kept in a content-addressed cache (`<cache>/sha256/<hex>`, surviving
restarts), downloaded into `<cache>/partial/<hex>.part`, resumed with Range after an
interruption, checked against the manifest's sha256 and renamed into place. A download
never takes more than the manifest's size of a file (a server that sends more is cut off,
and its bytes fail the check). A cached file that fails its check is deleted and fetched
again. The rank's files are then linked into a ShardStore-compatible directory, so
`ShardStore(dir).load_block(rank, ...)` works, and after a re-plan every block whose sha256
is already cached is reused without a download. After each fetch the cache is pruned to the
KEEP_STORES most recent stores: other store directories, the files only they used, and
partial downloads of files no kept store uses are deleted (skipped while another process
fetches into the same cache).
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from urllib.parse import quote

from tpi.comm import auth
from tpi.config import ModelConfig
from tpi.weights.store import EMBED_PATH, FORMAT_VERSION, MANIFEST, ShardStore, execution_order, piece_file

log = logging.getLogger("tpi.shards")

BEARER_LABEL = b"tpi-shards-bearer-v1\x00"
MANIFEST_LABEL = b"tpi-shards-manifest-v1\x00"
MAC_HEADER = "X-TPI-Manifest-MAC"
NONCE_HEADER = "X-TPI-Nonce"
STORE_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
NONCE_RE = re.compile(r"^[0-9a-f]{32,128}$")
CHUNK = 1 << 20
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
KEEP_STORES = 2   # a worker's cache keeps the stores of its current and its previous plan


class DeliveryError(RuntimeError):
    """Shards could not be delivered: refused, unreachable, or bytes that fail their checksum."""


def bearer(token: str, store_id: str) -> str:
    return auth.mac(token, BEARER_LABEL, store_id)


def manifest_mac(token: str, store_id: str, nonce: str, body: bytes) -> str:
    return auth.mac(token, MANIFEST_LABEL, store_id, nonce, hashlib.sha256(body).digest())


# ---------------------------------------------------------------------------------------
# Client: the content-addressed cache

class ShardCache:
    """`<root>/sha256/<hex>`: verified files, named by content. `<root>/partial/`: downloads
    in progress. `<root>/stores/`: materialised store directories (links into sha256/)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blobs = self.root / "sha256"
        self.partial = self.root / "partial"
        for d in (self.blobs, self.partial):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        if not SHA_RE.match(sha):
            raise DeliveryError(f"not a sha256: {sha!r}")
        return self.blobs / sha

    def has(self, sha: str, size: int, verify: bool = True) -> bool:
        """Whether a good copy is cached; a bad one (size or hash) is deleted."""
        path = self.path(sha)
        try:
            if path.stat().st_size == size and (not verify or _sha256_file(path) == sha):
                return True
        except FileNotFoundError:
            return False
        log.warning("shards: cached %s failed its check; deleted, fetching again", path)
        path.unlink(missing_ok=True)
        return False

    def prune(self, keep_stores: int = KEEP_STORES) -> int:
        """Keep the `keep_stores` most recently made store directories and the files they use;
        delete the other stores, every other cached file and partial download. Returns the
        bytes freed. Skipped (0) while another process fetches into this cache."""
        with self.lock(exclusive=True) as held:
            if not held:
                return 0
            stores = sorted(self.root.glob("stores/*/rank-*"), key=lambda p: p.stat().st_mtime, reverse=True)
            keep: set[str] = set()
            for store in stores[:keep_stores]:
                keep |= _store_shas(store)
            freed = 0
            for store in stores[keep_stores:]:
                shutil.rmtree(store, ignore_errors=True)
                if not any(store.parent.iterdir()):
                    store.parent.rmdir()
            for p in [*self.blobs.iterdir(), *self.partial.iterdir()]:
                if p.name.removesuffix(".part") not in keep:
                    freed += p.stat().st_size
                    p.unlink(missing_ok=True)
            return freed

    def lock(self, exclusive: bool):
        """Shared while fetching, exclusive (without waiting) to prune: `with cache.lock(...) as held`."""
        return _CacheLock(self.root / ".lock", exclusive)


class _CacheLock:
    def __init__(self, path: Path, exclusive: bool):
        self.path, self.exclusive, self.fd = path, exclusive, None

    def __enter__(self) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB if self.exclusive else fcntl.LOCK_SH)
            return True
        except BlockingIOError:
            return False

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the lock


def _store_shas(store: Path) -> set[str]:
    """sha256 of the files a materialised store directory holds (from its manifest)."""
    try:
        files = json.loads((store / MANIFEST).read_bytes())["files"]
        return {files[rel]["sha256"] for rel in files if (store / rel).exists()}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Client: fetching

@dataclass
class FetchResult:
    store: ShardStore | None = None  # the materialised store (set when `fetch` returns)
    files_downloaded: int = 0
    bytes_downloaded: int = 0     # body bytes received for files (manifest excluded)
    files_reused: int = 0         # already in the cache with the right sha256
    bytes_reused: int = 0
    resumed: int = 0              # downloads continued with a Range request


class ShardClient:
    """Fetches one store's files for one rank from the master's shard server.

    client = ShardClient("http://master:8000", token, cache_dir="/var/cache/tpi/shards")
    result = client.fetch(store_id, rank)          # -> FetchResult; result.store is a ShardStore
    """

    def __init__(self, base_url: str, token: str, cache_dir: str | Path, *, url_prefix: str = "/shards",
                 timeout: float = 30.0, attempts: int = 5, verify_cache: bool = True):
        bearer(token, "")
        self.base = base_url.rstrip("/") + url_prefix
        self.token = token
        self.cache = ShardCache(cache_dir)
        self.timeout, self.attempts, self.verify_cache = timeout, attempts, verify_cache
        # The master is on the LAN: never send shards or bearers through an environment proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(self, store_id: str, rank: int, dest: str | Path | None = None,
              include_head: bool = False) -> FetchResult:
        """Make `dest` (default `<cache>/stores/<store-id>/rank-<rank>`) a shard store holding
        this rank's blocks (layers and its output-head slice; the master's embedding too if
        asked), downloading only what is not cached."""
        if not STORE_ID_RE.match(store_id):
            raise DeliveryError(f"bad store id {store_id!r}")
        body, manifest = self.fetch_manifest(store_id)
        world = len(manifest["plan"]["shards"])
        if not 0 <= rank < world:
            raise DeliveryError(f"store {store_id} has ranks 0..{world - 1}, not {rank}")
        try:
            cfg = ModelConfig.from_json(manifest["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeliveryError(f"store {store_id}: manifest's model_config is unreadable: {e!r}") from None
        pieces = manifest.get("pieces", {}).get(str(rank))
        if pieces is None:
            raise DeliveryError(f"store {store_id}: manifest has no pieces for rank {rank}")
        wanted = [piece_file(rank, *key, pieces) for key in execution_order(cfg, pieces)]
        if include_head:
            wanted.append(EMBED_PATH)
        files = manifest["files"]
        missing = [rel for rel in wanted if rel not in files]
        if missing:
            raise DeliveryError(f"store {store_id}: manifest lacks {', '.join(missing[:3])}")
        stats = FetchResult()
        in_cache = dest is None  # a store of the cache's own (pruned with it)
        dest = Path(dest) if dest is not None else self.cache.root / "stores" / store_id / f"rank-{rank}"
        with self.cache.lock(exclusive=False):
            for rel in wanted:
                sha, size = files[rel]["sha256"], int(files[rel]["bytes"])
                if self.cache.has(sha, size, verify=self.verify_cache):
                    stats.files_reused += 1
                    stats.bytes_reused += size
                    continue
                self._download(store_id, rel, sha, size, stats)
                stats.files_downloaded += 1
            _materialise(dest, body, {rel: self.cache.path(files[rel]["sha256"]) for rel in wanted})
        stats.store = ShardStore(dest)
        freed = self.cache.prune() if in_cache else 0
        if freed:
            log.info("shards: pruned %.1f MB of earlier plans' files from %s", freed / 1e6, self.cache.root)
        log.info("shards: store %s rank %d ready at %s: %d files downloaded (%.1f MB), %d reused (%.1f MB)",
                 store_id, rank, dest, stats.files_downloaded, stats.bytes_downloaded / 1e6,
                 stats.files_reused, stats.bytes_reused / 1e6)
        return stats

    def fetch_manifest(self, store_id: str) -> tuple[bytes, dict]:
        """The manifest's bytes and JSON, refused unless the server proves it holds the token."""
        nonce = secrets.token_hex(16)
        url = f"{self.base}/{store_id}/manifest"
        req = self._request(url, store_id, {NONCE_HEADER: nonce})
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    body = resp.read()
                    mac = resp.headers.get(MAC_HEADER, "")
                break
            except urllib.error.HTTPError as e:
                raise self._http_error(e, url) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                last = e
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
        else:
            raise DeliveryError(f"shard server {url} unreachable after {self.attempts} attempts: {last}")
        if not auth.verify(manifest_mac(self.token, store_id, nonce, body), mac):
            raise DeliveryError(f"shard server {url} did not prove it holds the join token "
                                "(manifest MAC missing or wrong): refusing its files")
        try:
            manifest = json.loads(body)
        except json.JSONDecodeError as e:
            raise DeliveryError(f"manifest from {url} is not JSON: {e}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise DeliveryError(f"manifest from {url} has unknown format {manifest.get('format')!r}")
        return body, manifest

    def _request(self, url: str, store_id: str, headers: dict | None = None) -> urllib.request.Request:
        h = {"Authorization": f"Bearer {bearer(self.token, store_id)}", **(headers or {})}
        return urllib.request.Request(url, headers=h)

    def _http_error(self, e: urllib.error.HTTPError, url: str) -> DeliveryError:
        if e.code == 401:
            return DeliveryError(f"shard server refused {url}: the join token differs from the master's")
        return DeliveryError(f"shard server answered {e.code} {e.reason} for {url}")

    def _download(self, store_id: str, rel: str, sha: str, size: int, stats: FetchResult) -> None:
        """Into the cache, resuming a partial file; a full copy that fails its sha256 is
        deleted and fetched once more from scratch before giving up."""
        url = f"{self.base}/{store_id}/files/{quote(rel)}"
        part = self.cache.partial / f"{sha}.part"
        mismatches, failures = 0, 0
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if offset > size:
                part.unlink()
                offset = 0
            try:
                if offset < size:
                    self._get_range(url, store_id, sha, part, offset, size, stats)
                have = part.stat().st_size if part.exists() else 0
                if have < size:  # the body ended early: a cut connection
                    raise http.client.IncompleteRead(b"", size - have)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                if isinstance(e, urllib.error.HTTPError):
                    if e.code != 416:
                        raise self._http_error(e, url) from None
                    part.unlink(missing_ok=True)  # our partial file is longer than theirs
                have = part.stat().st_size if part.exists() else 0
                failures = 1 if have > offset else failures + 1  # attempts in a row without progress
                if failures >= self.attempts:
                    raise DeliveryError(f"{rel}: download from {url} failed {failures} times in a row "
                                        f"(last: {e!r}); {have} of {size} bytes kept for resuming") from None
                log.warning("shards: %s interrupted at %d of %d bytes (%r); resuming", rel, have, size, e)
                time.sleep(min(2.0, 0.2 * 2 ** (failures - 1)))
                continue
            digest = _sha256_file(part)
            if digest == sha:
                os.replace(part, self.cache.path(sha))
                return
            part.unlink()
            mismatches += 1
            if mismatches >= 2:
                raise DeliveryError(
                    f"{rel} in store {store_id}: the server's bytes have sha256 {digest}, its manifest "
                    f"says {sha}: the file on the master is altered or corrupt (download deleted, not used)")
            log.warning("shards: %s failed its sha256 check; deleted, fetching again from the start", rel)

    def _get_range(self, url: str, store_id: str, sha: str, part: Path, offset: int, size: int,
                   stats: FetchResult) -> None:
        """Append the bytes from `offset` up to `size` to `part` (or rewrite it if the server
        sends all); bytes past `size` are never read (the connection is dropped)."""
        headers = {}
        if offset:
            headers = {"Range": f"bytes={offset}-", "If-Range": f'"{sha}"'}
        with self._opener.open(self._request(url, store_id, headers), timeout=self.timeout) as resp:
            if offset and resp.status == 206:
                start = _range_start(resp.headers.get("Content-Range", ""), url)
                if start != offset:
                    raise DeliveryError(f"{url}: asked for bytes from {offset}, got from {start}")
                stats.resumed += 1
                mode = "ab"
            else:  # 200: the server sends it all (no range support, or the file changed)
                mode, offset = "wb", 0
            with open(part, mode) as f:
                try:
                    left = size - offset
                    while left > 0 and (chunk := resp.read(min(CHUNK, left))):
                        f.write(chunk)
                        left -= len(chunk)
                        stats.bytes_downloaded += len(chunk)
                finally:
                    f.flush()
                    os.fsync(f.fileno())


def _range_start(content_range: str, url: str) -> int:
    """The first byte of a 206 reply's `Content-Range: bytes START-END/TOTAL`."""
    m = CONTENT_RANGE_RE.match(content_range.strip())
    if m is None or int(m.group(2)) < int(m.group(1)):
        raise DeliveryError(f"{url}: a partial reply with a malformed Content-Range {content_range[:80]!r}")
    return int(m.group(1))


def _materialise(dest: Path, manifest: bytes, links: dict[str, Path]) -> None:
    """Build the store directory next to `dest` and swap it in: manifest written last."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for rel, blob in links.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, target)          # same filesystem: no copy, no extra space
            except OSError:
                try:
                    os.symlink(blob.resolve(), target)
                except OSError:
                    shutil.copyfile(blob, target)
        (tmp / MANIFEST).write_bytes(manifest)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
