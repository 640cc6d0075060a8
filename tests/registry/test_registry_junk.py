"""Faults in the registry's contents, against a real redis-server and real worker processes:
a junk record costs only itself, and only the master's signed refusal stops a worker."""
from __future__ import annotations

import json
import time

from tpi.cluster.membership import Membership
from tpi.cluster.records import RECORD_LABEL
from tpi.cluster.registry import HEARTBEAT_S, Keys, decode_record, encode_rejection
from tpi.comm import auth

from test_registry import TOKEN, wait_until, worker

DEEP = b"[" * 200_000 + b"]" * 200_000


def test_junk_records_do_not_freeze_admission(redis_server, spawn):
    """Deeply nested JSON (unsigned, and after a fake MAC), not-JSON bytes and a record
    whose proof verifies but whose fields are mistyped sit beside the workers' records; the
    workers are admitted all the same, each junk record refused on its own."""
    r = redis_server.client()
    keys = Keys()
    r.set(keys.worker("junk-deep"), DEEP)
    r.set(keys.worker("junk-deep-mac"), b"00" * 32 + b"." + DEEP)
    r.set(keys.worker("junk-bytes"), bytes(range(256)))
    body = json.dumps({"format": 1, "role": "worker", "id": "junk-typed", "capability": [1, 2],
                       "version": "x", "session": "s"}).encode()
    r.set(keys.worker("junk-typed"), auth.mac(TOKEN, RECORD_LABEL, body).encode() + b"." + body)
    with Membership(redis_server.url, TOKEN) as m:
        a, b = worker(spawn, redis_server, "w-a"), worker(spawn, redis_server, "w-b")
        a.expect("registered")
        b.expect("registered")
        assert m.wait(lambda ms: {"w-a", "w-b"} <= set(ms), timeout=10), m.refused()
        assert wait_until(lambda: {"junk-deep", "junk-deep-mac", "junk-bytes", "junk-typed"} <= set(m.refused()),
                          timeout=5), m.refused()
        assert set(m.members()) == {"w-a", "w-b"}


def test_only_a_signed_refusal_stops_a_worker(redis_server, spawn):
    r = redis_server.client()
    keys = Keys()
    with Membership(redis_server.url, TOKEN) as m:
        w = worker(spawn, redis_server, "w-target")
        w.expect("registered")
        assert m.wait(lambda ms: "w-target" in ms, timeout=5)
        session = decode_record(r.get(keys.worker("w-target")), TOKEN).session
        # Anyone with Redis access: the old unsigned form, and one signed with a guessed token.
        r.set(keys.rejected("w-target"), json.dumps({"session": session, "reason": "forged"}))
        time.sleep(3 * HEARTBEAT_S)
        r.set(keys.rejected("w-target"), encode_rejection("a guessed token", "w-target", session, "forged"))
        time.sleep(3 * HEARTBEAT_S)
        assert w.p.poll() is None, "the worker exited on a forged refusal"
        assert "w-target" in m.members()
        # A refusal signed for another worker id does not count either.
        r.set(keys.rejected("w-target"), encode_rejection(TOKEN, "w-other", session, "not you"))
        time.sleep(3 * HEARTBEAT_S)
        assert w.p.poll() is None
        # The master's own (signed with the join token) does.
        r.set(keys.rejected("w-target"), encode_rejection(TOKEN, "w-target", session, "go away"))
        assert w.expect("rejected:", timeout=10) == "rejected: go away"
        assert w.wait() == 3
