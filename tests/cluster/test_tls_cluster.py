"""`tpi master --tls-cert/--tls-key` and `tpi worker --tls-ca`: the hub speaks wss:// only;
a worker that trusts the master's certificate serves, a plain ws:// worker or one trusting
another certificate is never admitted, and says why."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import requests

from procs import Server, free_port, wait_for

TOKEN = "tls-cluster-token"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def self_signed(d, name: str) -> tuple[str, str]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return str(cert), str(key)


def worker(url: str, log_path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tpi_cli", "worker", "--master", url, "--join-token", TOKEN,
                             "--timeout", "3", *extra], stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


def test_workers_join_over_tls_only_when_they_trust_the_master(tmp_path):
    cert, key = self_signed(tmp_path, "master")
    other_cert, _ = self_signed(tmp_path, "other")
    hub, http = free_port(), free_port()
    plain = worker(f"ws://127.0.0.1:{hub}", tmp_path / "plain.log")
    wrong = worker(f"wss://127.0.0.1:{hub}", tmp_path / "wrong.log", "--tls-ca", other_cert)
    master = Server("master", ["master", "--http", f"127.0.0.1:{http}", "--listen", f"127.0.0.1:{hub}",
                               "--devices", "2", "--join-token", TOKEN, "--dtype", "float32", "--timeout", "3",
                               "--tls-cert", cert, "--tls-key", key], http, tmp_path)
    good = None
    try:
        # Both wrong workers keep trying and are never admitted: the master waits on.
        assert wait_for(lambda: "certificate verify failed" in (tmp_path / "wrong.log").read_text(errors="replace"), 120)
        assert wait_for(lambda: "cannot reach the master" in (tmp_path / "plain.log").read_text(errors="replace"), 120)
        assert not _up(master), "the master serves before any worker it trusts joined"
        good = worker(f"wss://127.0.0.1:{hub}", tmp_path / "good.log", "--tls-ca", cert, "--name", "pi-1")
        master.wait_ready()
        r = requests.post(master.url + "/v1/chat/completions", timeout=300, json={
            "model": "smollm2", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        assert "joined wss://127.0.0.1" in (tmp_path / "good.log").read_text()
        devices = requests.get(master.url + "/api/cluster", timeout=10).json()["devices"]
        assert [d["name"] for d in devices] == ["master", "pi-1"]           # the worker's own name
        assert devices[1]["state"] == "up" and devices[1]["address"].startswith("127.0.0.1:")
        assert devices[1]["memory"]["peak_rss_bytes"] > 0 and "rtt_ms" in devices[1]["link"]
        assert plain.poll() is None and wrong.poll() is None      # still outside, still trying
        assert "joined" not in (tmp_path / "plain.log").read_text() + (tmp_path / "wrong.log").read_text()
    finally:
        master.stop()
        for p in (plain, wrong, good):
            if p is not None:
                p.kill()


def _up(master: Server) -> bool:
    """Serving the API (while it starts, the master answers /healthz with 503: its shard server)."""
    try:
        return requests.get(master.url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_worker_refuses_a_ca_for_a_plain_url(tmp_path):
    cert, _ = self_signed(tmp_path, "master")
    proc = subprocess.run([sys.executable, "-m", "tpi_cli", "worker", "--master", f"ws://127.0.0.1:{free_port()}",
                           "--join-token", TOKEN, "--tls-ca", cert], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not wss://" in proc.stderr
