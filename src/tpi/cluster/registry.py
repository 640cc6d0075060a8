"""The Redis registry: how the master and the workers find each other.

Every key, TTL and channel the project uses in Redis is defined in this module (`Keys`).

  tpi:<cluster>:master           the master's record (string, expires after TTL_S)
  tpi:<cluster>:worker:<id>      one worker's record (string, expires after TTL_S)
  tpi:<cluster>:rejected:<id>    why the master refused that worker (JSON, REJECT_TTL_S)
  tpi:<cluster>:events           pub/sub channel: {"event": "join"|"leave"|"rejected", "role", "id"}

A record is `<mac>.<body>`: body is the JSON of a `DeviceRecord`, mac is
HMAC-SHA256(join token, RECORD_LABEL + body). A process keeps its record alive by writing it
again every HEARTBEAT_S with a TTL of TTL_S (so a killed process vanishes within TTL_S) and
with its `beat` counter advanced; a clean stop deletes it. Each write is a whole record, so
after a Redis restart (which forgets everything) the next heartbeat registers again.

Membership (`tpi.cluster.membership`, the master's view of the workers) is read by polling the
worker keys every POLL_S; the events channel only wakes the poller early, so a join or a
clean leave shows at once and a crash within TTL_S + POLL_S. Events carry no authority:
they are hints, the signed records are the truth.

Trust: the Redis password (from the URL, `redis://:PASSWORD@host:6379/0`) keeps strangers
out of Redis; the join token proves membership. The master ignores a worker record whose
MAC fails, logs it once, and tells that worker through `rejected:<id>` (naming the record's
`session`, so a restarted worker is not confused by an old refusal), signed with the join
token (tpi.cluster.records). The worker reads that key on every heartbeat; a verified refusal
stops it, an unverified one (anyone with Redis access could write it; so does a master with
another join token) is logged and ignored. One junk record costs only itself: decoding
raises nothing but RecordError, and the master refuses that record and reads the rest. A record whose `beat` stops advancing is
treated as gone after TTL_S, so a copied record cannot keep a dead device alive.

Every client retries with exponential backoff when Redis is unreachable and never raises
from its thread; the master keeps its current member view during an outage and for a grace
period after it (until the workers had time to re-register).
"""
from __future__ import annotations

import atexit
import json
import logging
import random
import secrets
import threading
import time
from dataclasses import replace
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tpi.cluster.capability import DeviceCapability
from tpi.cluster.records import (  # noqa: F401  (the record codec, re-exported with the keys)
    ID_RE, ROLES, DeviceRecord, ProofError, RecordError, decode_record, decode_rejection, encode_record,
    encode_rejection, require_token, unverified_fields,
)

log = logging.getLogger("tpi.cluster.registry")

TTL_S = 3.0            # a record lives this long without a heartbeat
HEARTBEAT_S = 1.0      # how often a live process rewrites its record
POLL_S = 0.25          # how often the master re-reads the worker records
REJECT_TTL_S = 30.0    # how long a refusal stays readable by the refused worker
SOCKET_TIMEOUT_S = 1.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 2.0


class Keys:
    """The Redis names of one cluster. Several clusters can share one Redis."""

    def __init__(self, cluster: str = "default"):
        if not ID_RE.match(cluster):
            raise ValueError(f"cluster name {cluster!r}: use 1-64 of A-Z a-z 0-9 . _ : -")
        self.prefix = f"tpi:{cluster}:"
        self.master = self.prefix + "master"
        self.worker_pattern = self.prefix + "worker:*"
        self.events = self.prefix + "events"

    def worker(self, device_id: str) -> str:
        return self.prefix + "worker:" + device_id

    def rejected(self, device_id: str) -> str:
        return self.prefix + "rejected:" + device_id

    def record(self, role: str, device_id: str) -> str:
        return self.master if role == "master" else self.worker(device_id)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tpi")
    except PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------------------------------
# Connection and backoff

def connect(url: str, password: str | None = None) -> redis.Redis:
    """A client for `url` (redis://, rediss:// or unix://). The URL's password wins; else
    `password`. No internal retries: the callers here back off themselves."""
    return redis.Redis.from_url(url, password=password, socket_timeout=SOCKET_TIMEOUT_S,
                                socket_connect_timeout=SOCKET_TIMEOUT_S, retry=Retry(NoBackoff(), 0))


def redact(url: str) -> str:
    """`url` without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def describe_error(e: Exception) -> str:
    if isinstance(e, redis.AuthenticationError) or "NOAUTH" in str(e) or "WRONGPASS" in str(e):
        return f"authentication failed ({e}): check the password in the registry URL"
    return f"{type(e).__name__}: {e}"


class Backoff:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... up to 2 s."""

    def __init__(self, lo: float = BACKOFF_MIN_S, hi: float = BACKOFF_MAX_S):
        self.lo, self.hi, self.n = lo, hi, 0

    def next(self) -> float:
        delay = min(self.hi, self.lo * 2 ** self.n)
        self.n += 1
        return delay * random.uniform(0.75, 1.0)

    def reset(self) -> None:
        self.n = 0


REDIS_ERRORS = (redis.RedisError, OSError)

# Write the record only if the key is absent or holds this session: a second live process
# with the same id (or a second master) does not silently steal the name.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur and not string.find(cur, ARGV[2], 1, true) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""
_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, ARGV[1], 1, true) then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _session_marker(session: str) -> str:
    return f'"session":"{session}"'


def publish_event(client: redis.Redis, keys: Keys, event: str, role: str, device_id: str) -> None:
    """A wake-up hint on the events channel (unauthenticated: readers re-read the records)."""
    client.publish(keys.events, json.dumps({"event": event, "role": role, "id": device_id}))


# ---------------------------------------------------------------------------------------
# One process's own record

class Registration:
    """Keeps this process's record alive in the registry from a background thread.

    reg = Registration(url, token, "worker", "pi-1", "10.0.0.7:29600", capability).start()
    ...
    reg.stop()          # deletes the record (also done at interpreter exit)

    `rejected` is the master's reason once it refused this worker (the heartbeat then stops);
    `on_rejected(reason)` is called from the thread when that happens.
    """

    def __init__(self, url: str, token: str, role: str, device_id: str, address: str | None,
                 capability: DeviceCapability, *, http_url: str | None = None, cluster: str = "default",
                 password: str | None = None, on_rejected: Callable[[str], None] | None = None,
                 ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not ID_RE.match(device_id):
            raise ValueError(f"device id {device_id!r}: use 1-64 of A-Z a-z 0-9 . _ : -")
        require_token(token)
        self.url, self.token, self.password = url, token, password
        self.keys = Keys(cluster)
        self.key = self.keys.record(role, device_id)
        self.record = DeviceRecord(role, device_id, address, capability, package_version(),
                                   secrets.token_hex(16), http_url)
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.on_rejected = on_rejected
        self.rejected: str | None = None
        self._unverified_refusal: bytes | None = None
        self.registered = threading.Event()   # set while the last write succeeded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._ever = False                    # the record was written at least once

    def start(self) -> "Registration":
        self._thread = threading.Thread(target=self._run, name=f"registry-{self.record.id}", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def __enter__(self) -> "Registration":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_registered(self, timeout: float | None = None) -> bool:
        return self.registered.wait(timeout)

    def stop(self, deregister: bool = True) -> None:
        """Stop heartbeating and (by default) delete the record if it is still ours."""
        atexit.unregister(self.stop)
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 2 * SOCKET_TIMEOUT_S)
        if deregister and self.rejected is None and self._ever:
            self._release()

    def _release(self) -> None:
        try:
            client = self._client or connect(self.url, self.password)
            if client.eval(_RELEASE, 1, self.key, _session_marker(self.record.session)):
                publish_event(client, self.keys, "leave", self.record.role, self.record.id)
                log.info("registry: %s %s deregistered", self.record.role, self.record.id)
        except REDIS_ERRORS as e:
            log.warning("registry: could not deregister %s (%s); its record expires in %.0f s",
                        self.record.id, describe_error(e), self.ttl_s)
        self.registered.clear()

    def _run(self) -> None:
        backoff, down_since, conflict_logged = Backoff(), None, False
        while not self._stop.is_set():
            try:
                if self._client is None:
                    self._client = connect(self.url, self.password)
                rec = self.record = replace(self.record, beat=self.record.beat + 1, ts=time.time())
                pipe = self._client.pipeline(transaction=False)
                pipe.eval(_CLAIM, 1, self.key, encode_record(rec, self.token),
                          _session_marker(rec.session), int(self.ttl_s * 1000))
                if rec.role == "worker":
                    pipe.get(self.keys.rejected(rec.id))
                results = pipe.execute()
                if self._check_rejected(results[1] if len(results) > 1 else None):
                    return
                if not results[0]:
                    if not conflict_logged:
                        log.warning("registry: %s is held by another live process (another %s with id %r?); "
                                    "waiting for it to expire", self.key, rec.role, rec.id)
                        conflict_logged = True
                    self.registered.clear()
                else:
                    if not self.registered.is_set():
                        publish_event(self._client, self.keys, "join", rec.role, rec.id)
                        if down_since is not None:
                            log.info("registry %s reachable again after %.1f s: %s %s registered again",
                                     redact(self.url), time.monotonic() - down_since, rec.role, rec.id)
                        elif not self._ever:
                            log.info("registry: %s %s registered at %s (address %s)",
                                     rec.role, rec.id, redact(self.url), rec.address)
                        self.registered.set()
                    self._ever, down_since, conflict_logged = True, None, False
                backoff.reset()
                delay = self.heartbeat_s
            except REDIS_ERRORS as e:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("registry %s unreachable (%s): retrying with backoff",
                                redact(self.url), describe_error(e))
                self.registered.clear()
                delay = backoff.next()
            except Exception:  # never let the heartbeat thread die
                log.exception("registry: heartbeat of %s failed", self.record.id)
                delay = backoff.next()
            self._stop.wait(delay)

    def _check_rejected(self, raw: bytes | None) -> bool:
        """Stop if `raw` is the master's signed refusal of this session. A refusal that does
        not verify under our token (written by anyone with Redis access, or by a master
        with another join token) is reported once and changes nothing."""
        if raw is None:
            return False
        try:
            info, verified = decode_rejection(raw, self.token, self.record.id)
        except RecordError:
            return False
        if info.get("session") != self.record.session:
            return False  # a refusal of an earlier run of this id
        reason = str(info.get("reason", "refused"))[:500]
        if not verified:
            if self._unverified_refusal != raw:
                self._unverified_refusal = raw
                log.error("registry: a refusal of worker %s that this worker's join token does not verify "
                          "says %r; ignored, not admitted meanwhile (the master has another --join-token, "
                          "or the entry is forged)", self.record.id, reason)
            return False
        self.rejected = reason
        log.error("registry: the master refused worker %s: %s", self.record.id, self.rejected)
        try:
            self._client.eval(_RELEASE, 1, self.key, _session_marker(self.record.session))
        except REDIS_ERRORS:
            pass
        self.registered.clear()
        self._stop.set()
        if self.on_rejected is not None:
            self.on_rejected(self.rejected)
        return True


def register_worker(url: str, token: str, device_id: str, address: str | None,
                    capability: DeviceCapability, **kw) -> Registration:
    """Start heartbeating this worker's record; see `Registration`."""
    return Registration(url, token, "worker", device_id, address, capability, **kw).start()


def register_master(url: str, token: str, address: str, capability: DeviceCapability,
                    http_url: str | None = None, device_id: str = "master", **kw) -> Registration:
    """Start heartbeating the master's record so workers can find its hub (and shard server)."""
    return Registration(url, token, "master", device_id, address, capability, http_url=http_url, **kw).start()


class RegistryTimeout(TimeoutError):
    """The awaited record did not appear in time."""


def find_master(url: str, token: str, *, cluster: str = "default", password: str | None = None,
                timeout: float | None = None) -> DeviceRecord:
    """Wait for the master's record (verified with the join token) and return it.
    A record that does not verify is logged once and waited past (the token may be wrong)."""
    keys, backoff, client = Keys(cluster), Backoff(), None
    deadline = None if timeout is None else time.monotonic() + timeout
    reason, logged = "no master is registered", set()
    while True:
        try:
            client = client or connect(url, password)
            raw = client.get(keys.master)
            backoff.reset()
            if raw is not None:
                return decode_record(raw, token)
            reason, delay = "no master is registered", POLL_S
        except RecordError as e:
            reason = (f"the master record does not verify with this join token ({e}): check --join-token"
                      if isinstance(e, ProofError) else f"the master record is malformed: {e}")
            delay = HEARTBEAT_S
        except REDIS_ERRORS as e:
            reason = f"registry {redact(url)} unreachable ({describe_error(e)})"
            delay = backoff.next()
        if reason not in logged:
            logged.add(reason)
            if reason != "no master is registered":
                log.error("registry: %s", reason)
        if deadline is not None and time.monotonic() + delay > deadline:
            raise RegistryTimeout(f"no usable master record after {timeout:.1f} s: {reason}")
        time.sleep(delay)
