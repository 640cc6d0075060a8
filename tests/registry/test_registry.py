"""The Redis registry against a real redis-server and real worker processes."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest

from tpi.cluster.capability import DeviceCapability
from tpi.cluster.membership import Membership
from tpi.cluster.registry import (
    HEARTBEAT_S, POLL_S, TTL_S, DeviceRecord, Keys, ProofError, Registration, RegistryTimeout,
    decode_record, encode_record, find_master, redact, register_master,
)

TOKEN = "correct horse battery staple"
CAP = DeviceCapability("x86_64", 4, 8 << 30, 6 << 30, 12.5, 400.0, "float32")


class Recorder:
    """on_change callback that timestamps joins and leaves."""

    def __init__(self):
        self.events: list[tuple[str, str, float]] = []

    def __call__(self, change):
        now = time.monotonic()
        self.events += [("join", r.id, now) for r in change.joined]
        self.events += [("leave", r.id, now) for r in change.left]

    def when(self, kind: str, device_id: str) -> float | None:
        return next((t for k, i, t in self.events if k == kind and i == device_id), None)


def wait_until(cond, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def worker(spawn, server, device_id: str, token: str = TOKEN, **kw):
    args = ["--url", server.url, "--token", token, "--id", device_id]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    return spawn("worker_proc.py", *args)


def test_record_roundtrip_and_proof():
    rec = DeviceRecord("worker", "w1", "10.0.0.2:29600", CAP, "0.1.0", "ab" * 16, beat=3, ts=1.5)
    raw = encode_record(rec, TOKEN)
    assert decode_record(raw, TOKEN) == rec
    with pytest.raises(ProofError):
        decode_record(raw, "another token")
    tampered = raw.replace(b"10.0.0.2", b"10.6.6.6")
    with pytest.raises(ProofError):
        decode_record(tampered, TOKEN)
    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert "s3cret" not in redact("redis://user:s3cret@h/0")


def test_register_heartbeat_and_sigkill_expiry(redis_server, spawn):
    rec = Recorder()
    with Membership(redis_server.url, TOKEN, on_change=rec) as m:
        w = worker(spawn, redis_server, "w-kill", gflops=20)
        w.expect("registered")
        assert m.wait(lambda ms: "w-kill" in ms, timeout=5)
        got = m.members()["w-kill"]
        assert got.capability.gflops == 20 and got.address == "127.0.0.1:29600"
        key = Keys().worker("w-kill")
        ttl_ms = redis_server.client().pttl(key)
        assert 0 < ttl_ms <= TTL_S * 1000
        # Heartbeats keep it alive well past one TTL.
        time.sleep(TTL_S + 1)
        assert "w-kill" in m.members()
        beat = decode_record(redis_server.client().get(key), TOKEN).beat
        assert beat >= TTL_S / HEARTBEAT_S

        killed = time.monotonic()
        w.signal(signal.SIGKILL)
        assert m.wait(lambda ms: "w-kill" not in ms, timeout=TTL_S + 3)
        gone_after = rec.when("leave", "w-kill") - killed
        assert gone_after <= TTL_S + POLL_S + 0.75, gone_after
        assert redis_server.client().get(key) is None


def test_clean_exit_deregisters_at_once(redis_server, spawn):
    rec = Recorder()
    with Membership(redis_server.url, TOKEN, on_change=rec) as m:
        w = worker(spawn, redis_server, "w-clean")
        w.expect("registered")
        assert m.wait(lambda ms: "w-clean" in ms, timeout=5)
        stopped = time.monotonic()
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
        assert redis_server.client().get(Keys().worker("w-clean")) is None
        assert m.wait(lambda ms: "w-clean" not in ms, timeout=2)
        assert rec.when("leave", "w-clean") - stopped < 1.0  # the leave event, not the TTL


def test_wrong_join_token_is_refused_and_told(redis_server, spawn, caplog):
    """The master refuses the record and says why; the worker, whose token cannot verify the
    master's signed refusal, reports it with the hint and is never admitted (it does not
    exit on a refusal it cannot verify: tests/registry/test_registry_junk.py)."""
    caplog.set_level(logging.INFO, logger="tpi.cluster.registry")
    with Membership(redis_server.url, TOKEN) as m:
        good = worker(spawn, redis_server, "w-good")
        bad = worker(spawn, redis_server, "w-bad", token="a guessed token")
        good.expect("registered")
        bad.expect("registered")
        assert m.wait(lambda ms: "w-good" in ms, timeout=5)
        assert wait_until(lambda: "w-bad" in m.refused(), timeout=5)
        time.sleep(2 * HEARTBEAT_S)
        assert "w-bad" not in m.members()
        bad.signal(signal.SIGTERM)
        assert bad.wait() == 0
        err = bad.stderr_tail()
        assert "refusal of worker w-bad that this worker's join token does not verify" in err, err
        assert "join-token proof does not verify" in err and "--join-token" in err, err
    refusals = [r.getMessage() for r in caplog.records if "refused worker w-bad" in r.getMessage()]
    assert len(refusals) == 1 and "--join-token" in refusals[0]


def test_worker_finds_master_and_wrong_token_cannot(redis_server, caplog):
    master = register_master(redis_server.url, TOKEN, "10.0.0.1:29500", CAP, http_url="http://10.0.0.1:8000")
    try:
        found = find_master(redis_server.url, TOKEN, timeout=5)
        assert found.address == "10.0.0.1:29500" and found.http_url == "http://10.0.0.1:8000"
        assert found.role == "master"
        with pytest.raises(RegistryTimeout, match="join token"):
            find_master(redis_server.url, "not the token", timeout=1.5)
    finally:
        master.stop()
    assert redis_server.client().get(Keys().master) is None
    with pytest.raises(RegistryTimeout, match="no master"):
        find_master(redis_server.url, TOKEN, timeout=0.5)


def test_second_process_with_same_id_does_not_steal_it(redis_server):
    a = Registration(redis_server.url, TOKEN, "worker", "twin", "h:1", CAP).start()
    assert a.wait_registered(5)
    b = Registration(redis_server.url, TOKEN, "worker", "twin", "h:2", CAP).start()
    try:
        assert not b.wait_registered(HEARTBEAT_S * 2.5)
        assert decode_record(redis_server.client().get(Keys().worker("twin")), TOKEN).address == "h:1"
        a.stop()
        assert b.wait_registered(TTL_S)
    finally:
        a.stop()
        b.stop()


def test_redis_restart_client_reregisters_master_keeps_view(redis_server, spawn, caplog):
    caplog.set_level(logging.INFO, logger="tpi.cluster.registry")
    rec = Recorder()
    master = register_master(redis_server.url, TOKEN, "10.0.0.1:29500", CAP)
    with Membership(redis_server.url, TOKEN, on_change=rec) as m:
        w = worker(spawn, redis_server, "w-outage")
        w.expect("registered")
        assert m.wait(lambda ms: "w-outage" in ms, timeout=5)

        redis_server.stop()
        time.sleep(TTL_S + 2)  # longer than a TTL: the view must not drop the worker
        assert w.p.poll() is None, "worker process died during the outage"
        assert "w-outage" in m.members()
        assert not m.healthy.is_set()

        redis_server.start()  # same port, empty: everything must be written again
        key = Keys().worker("w-outage")
        assert wait_until(lambda: redis_server.client().get(key) is not None, timeout=6)
        assert find_master(redis_server.url, TOKEN, timeout=6).address == "10.0.0.1:29500"
        assert m.healthy.wait(5)
        time.sleep(TTL_S + 2)  # past the grace period: the worker stayed a member throughout
        assert "w-outage" in m.members()
        assert rec.when("leave", "w-outage") is None
        assert w.p.poll() is None
    master.stop()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "unreachable" in messages and "reachable again" in messages


def test_registry_password_from_url(redis_factory, spawn, caplog):
    server = redis_factory(password="p4ss-word")
    with Membership(server.url, TOKEN) as m:
        w = worker(spawn, server, "w-auth")
        w.expect("registered")
        assert m.wait(lambda ms: "w-auth" in ms, timeout=5)
    caplog.set_level(logging.WARNING, logger="tpi.cluster.registry")
    wrong = server.url.replace("p4ss-word", "nope")
    reg = Registration(wrong, TOKEN, "worker", "w-wrongpw", None, CAP).start()
    try:
        assert not reg.wait_registered(1.0)
        assert reg._thread.is_alive()  # retries, never crashes
    finally:
        reg.stop()
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "authentication failed" in text and "nope" not in text


def test_tpi_worker_deregisters_on_sigterm(redis_server):
    """The real `tpi worker` (here waiting for a master that never comes): `docker stop`
    sends SIGTERM, and the record must go at once, not when its TTL runs out."""
    key = Keys().worker("w-term")
    proc = subprocess.Popen([sys.executable, "-m", "tpi_cli", "worker", "--registry", redis_server.url,
                             "--join-token", TOKEN, "--name", "w-term"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while redis_server.client().get(key) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "not registered"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert redis_server.client().get(key) is None, "record left to expire"
        assert "deregistered" in proc.stdout.read()
    finally:
        proc.kill()
