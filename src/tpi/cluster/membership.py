"""The master's live view of the workers in the registry (`tpi.cluster.registry` defines the keys,
TTLs, channel and records this reads).

The worker records are polled every POLL_S (SCAN + MGET); a message on the events channel
wakes the poller early, so a join or a clean leave shows at once and a crash within
TTL_S + POLL_S. Records that fail the join-token proof are refused: logged once, and the
worker is told through its `rejected:<id>` key.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from tpi.cluster.registry import (
    BACKOFF_MAX_S, HEARTBEAT_S, POLL_S, REDIS_ERRORS, REJECT_TTL_S, SOCKET_TIMEOUT_S, TTL_S, Backoff,
    ID_RE, DeviceRecord, Keys, ProofError, RecordError, connect, decode_record, describe_error, encode_rejection,
    publish_event, redact, require_token, unverified_fields,
)

log = logging.getLogger("tpi.cluster.registry")


@dataclass(frozen=True)
class MembershipChange:
    joined: tuple[DeviceRecord, ...]
    left: tuple[DeviceRecord, ...]
    members: dict[str, DeviceRecord] = field(default_factory=dict)


class Membership:
    """The master's live view of the registered, verified workers.

    m = Membership(url, token, on_change=lambda ch: replan(ch.members)).start()
    m.members()             # {id: DeviceRecord}
    m.refused()             # {id: reason} of workers refused since start
    m.stop()

    `on_change` is called from the watcher thread with each change; a worker that restarts
    (new session) is reported as left and joined again. During a
    registry outage the view is kept as it is; after it, workers get TTL_S + BACKOFF_MAX_S +
    HEARTBEAT_S to re-register before a missing one counts as gone.
    """

    def __init__(self, url: str, token: str, *, cluster: str = "default", password: str | None = None,
                 on_change: Callable[[MembershipChange], None] | None = None,
                 poll_s: float = POLL_S, ttl_s: float = TTL_S):
        require_token(token)
        self.url, self.token, self.password = url, token, password
        self.keys = Keys(cluster)
        self._listeners = [on_change] if on_change is not None else []
        self.poll_s, self.ttl_s = poll_s, ttl_s
        self.healthy = threading.Event()
        self._members: dict[str, DeviceRecord] = {}
        self._beats: dict[str, tuple[str, int, float]] = {}   # id -> (session, beat, when it last advanced)
        self._refused: dict[str, tuple[str, str, float]] = {}  # id -> (session, reason, when told)
        self._grace_until = 0.0
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Membership":
        self._thread = threading.Thread(target=self._run, name="registry-membership", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "Membership":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 2 * SOCKET_TIMEOUT_S + 1)

    def add_listener(self, listener: Callable[[MembershipChange], None]) -> None:
        """Call `listener(change)` from the watcher thread on every change from now on."""
        self._listeners.append(listener)

    def members(self) -> dict[str, DeviceRecord]:
        with self._lock:
            return dict(self._members)

    def refused(self) -> dict[str, str]:
        with self._lock:
            return {k: v[1] for k, v in self._refused.items()}

    def wait(self, predicate: Callable[[dict[str, DeviceRecord]], bool], timeout: float | None = None) -> bool:
        """Block until predicate(members) holds (re-checked on every change)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self._members), timeout)

    def _run(self) -> None:
        backoff, client, pubsub, down_since = Backoff(), None, None, None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    client = connect(self.url, self.password)
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.keys.events)
                self._refresh(client)
                if down_since is not None:
                    log.info("registry %s reachable again after %.1f s; keeping members while they re-register",
                             redact(self.url), time.monotonic() - down_since)
                    down_since = None
                self.healthy.set()
                backoff.reset()
                # Sleep until the next poll, or less if someone announces a change.
                if pubsub.get_message(timeout=self.poll_s) is not None:
                    while pubsub.get_message(timeout=0) is not None:
                        pass
            except REDIS_ERRORS as e:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("registry %s unreachable (%s): keeping %d members, retrying with backoff",
                                redact(self.url), describe_error(e), len(self._members))
                self.healthy.clear()
                self._grace_until = float("inf")
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
                pubsub = None
                self._stop.wait(backoff.next())
            except Exception:
                log.exception("registry: membership refresh failed")
                self._stop.wait(backoff.next())
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass

    def _refresh(self, client: redis.Redis) -> None:
        names = sorted(client.scan_iter(match=self.keys.worker_pattern, count=500))
        values = client.mget(names) if names else []
        now = time.monotonic()
        if self._grace_until == float("inf"):  # first successful read after an outage
            self._grace_until = now + self.ttl_s + BACKOFF_MAX_S + HEARTBEAT_S
        seen: dict[str, DeviceRecord] = {}
        for name, raw in zip(names, values):
            if raw is None:
                continue  # expired between SCAN and MGET
            key_id = name.decode(errors="replace")[len(self.keys.worker("")):]
            try:
                rec = decode_record(raw, self.token)
                if rec.role != "worker" or rec.id != key_id:
                    raise RecordError(f"record names {rec.role} {rec.id!r} under key of {key_id!r}")
            except RecordError as e:
                self._refuse(client, key_id, raw, e, now)
                continue
            except Exception as e:  # noqa: BLE001 - one junk record must not stop the others' admission
                self._refuse(client, key_id, raw, RecordError(f"unreadable record ({type(e).__name__})"), now)
                continue
            session, beat, since = self._beats.get(key_id, (None, None, now))
            if (session, beat) != (rec.session, rec.beat):
                self._beats[key_id] = (rec.session, rec.beat, now)
            elif now - since > self.ttl_s:
                continue  # its beat stopped advancing: a stale or replayed record
            seen[key_id] = rec
        with self._lock:
            for k in seen:
                self._refused.pop(k, None)  # e.g. restarted with the right token
            old = self._members
            new = dict(seen)
            if now < self._grace_until:
                for k, rec in old.items():
                    new.setdefault(k, rec)
            joined = tuple(r for k, r in new.items() if k not in old or old[k].session != r.session)
            left = tuple(r for k, r in old.items() if k not in new or new[k].session != r.session)
            self._members = new
            for k in [k for k in self._beats if k not in seen]:
                del self._beats[k]
            self._lock.notify_all()
        for r in left:
            log.info("registry: worker %s left (address %s)", r.id, r.address)
        for r in joined:
            log.info("registry: worker %s joined (address %s, %.1f GFLOP/s, disk %.0f MB/s, budget %.0f MiB)",
                     r.id, r.address, r.capability.gflops, r.capability.disk_mbps,
                     r.capability.mem_budget_bytes / 2**20)
        if joined or left:
            change = MembershipChange(joined, left, dict(new))
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:
                    log.exception("registry: membership listener failed")

    def _refuse(self, client: redis.Redis, key_id: str, raw: bytes, err: RecordError, now: float) -> None:
        info = unverified_fields(raw)
        session = str(info.get("session", ""))
        told = self._refused.get(key_id)
        if told and told[0] == session and now - told[2] < REJECT_TTL_S / 2:
            return
        reason = ("its join-token proof does not verify: the worker was started with a different --join-token"
                  if isinstance(err, ProofError) else f"malformed record: {err}")
        if not told or told[0] != session:
            log.warning("registry: refused worker %s (address %s, claims version %s): %s",
                        key_id, info.get("address"), info.get("version"), reason)
        if not ID_RE.match(key_id):
            return  # not a name a worker can have: nobody to tell
        client.set(self.keys.rejected(key_id), encode_rejection(self.token, key_id, session, reason),
                   px=int(REJECT_TTL_S * 1000))
        publish_event(client, self.keys, "rejected", "worker", key_id)
        with self._lock:
            self._refused[key_id] = (session, reason, now)
