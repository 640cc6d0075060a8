"""Finding the master on the LAN (tpi.cluster.discovery) with real multicast DNS on this
machine's interfaces: what is advertised is found and resolved to the hub's URL, a goodbye
removes it, a master of another protocol is left out, `tpi master --no-mdns` is not found,
and a worker with no address skips a master that cannot prove the join token and joins the
one that can. (The same between containers: tests/e2e/test_discovery_docker.py.)

Other masters on this machine may be advertising too (other tests): every check looks for
its own port, never for "the only master"."""
from __future__ import annotations

import json
import subprocess
import sys

import requests

from procs import Server, free_port, wait_for
from tpi.cluster.discovery import SERVICE_TYPE, Advertisement, find_masters

TOKEN = "discovery-test-token"
LOOPBACK = "127.0.0.1"  # every announcement and query of these tests stays on this machine


def found_on_port(port: int, timeout: float = 3.0) -> list[str]:
    return [m.url for m in find_masters(timeout, LOOPBACK) if m.url.endswith(f":{port}")]


def test_an_advertised_hub_is_found_then_forgotten():
    port = free_port()
    ad = Advertisement(port, host="127.0.0.1")
    try:
        assert wait_for(lambda: found_on_port(port), 20, 0) == [f"ws://127.0.0.1:{port}"]
    finally:
        ad.close()
    assert found_on_port(port, 2.0) == []      # the goodbye packet: browsers forget it at once


def test_a_master_of_another_protocol_is_left_out():
    from zeroconf import ServiceInfo, Zeroconf

    port, tls_port = free_port(), free_port()
    zc = Zeroconf(interfaces=[LOOPBACK])
    alien = ServiceInfo(SERVICE_TYPE, f"tpi master from the future {port}.{SERVICE_TYPE}", port=port,
                        addresses=[bytes([127, 0, 0, 1])], properties={"scheme": "ws", "protocol": "999"})
    zc.register_service(alien)
    secure = Advertisement(tls_port, tls=True, host="127.0.0.1")
    try:
        assert wait_for(lambda: found_on_port(tls_port), 20, 0) == [f"wss://127.0.0.1:{tls_port}"]
        assert found_on_port(port) == []
    finally:
        secure.close()
        zc.unregister_service(alien)
        zc.close()


def master(tmp_path, model, hub: int, *extra: str) -> Server:
    http = free_port()
    return Server("master", ["master", "--model", str(model), "--http", f"127.0.0.1:{http}",
                             "--listen", f"127.0.0.1:{hub}", "--devices", "2", "--join-token", TOKEN,
                             "--dtype", "float32", "--timeout", "5", *extra], http, tmp_path)


def test_no_mdns_master_is_not_advertised(tmp_path, tiny_model):
    hub = free_port()
    quiet = master(tmp_path, tiny_model("llama3"), hub, "--no-mdns")
    try:  # it waits for its worker now: the hub is up
        assert wait_for(lambda: "waiting for 1 worker" in quiet.log_path.read_text(errors="replace"), 120)
        assert found_on_port(hub, 4.0) == []
        assert "advertising the hub" not in quiet.log_path.read_text()
    finally:
        quiet.stop()


def test_a_worker_with_no_address_skips_an_impostor_and_joins_the_master(tmp_path, tiny_model):
    from tpi.comm.hub import StarHub

    model = tiny_model("llama3")
    impostor = StarHub(2, "not-the-token", "127.0.0.1", 0)     # a real hub that cannot prove TOKEN
    fake_ad = Advertisement(impostor.port, host="127.0.0.1")
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "tpi_cli", "worker", "--join-token", TOKEN, "--name", "lan-1",
                               "--mdns-interface", LOOPBACK],
                              stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    real = None
    try:
        impostor_url = f"ws://127.0.0.1:{impostor.port}"
        assert wait_for(lambda: f"found on the LAN at {impostor_url} refused this worker"
                        in log_path.read_text(errors="replace"), 120), log_path.read_text()
        assert worker.poll() is None                              # refused, still looking
        hub = free_port()
        real = master(tmp_path, model, hub).wait_ready()
        assert f"joined ws://127.0.0.1:{hub}" in log_path.read_text()
        r = requests.post(real.url + "/v1/completions", timeout=120, json={
            "model": str(model), "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["text"]
        alone = subprocess.run([sys.executable, "-m", "tpi_cli", "generate", "--model", str(model), "--devices", "2",
                                "--dtype", "float32", "--prompt", "The capital of France is", "--max-new-tokens", "6",
                                "--greedy", "--json"], capture_output=True, text=True, timeout=300)
        assert alone.returncode == 0, alone.stderr[-2000:]
        assert served == json.loads(alone.stdout)["text"]         # same greedy text as in one process
        devices = requests.get(real.url + "/api/cluster", timeout=10).json()["devices"]
        assert [d["name"] for d in devices] == ["master", "lan-1"]
    finally:
        worker.kill()
        if real is not None:
            real.stop()
        fake_ad.close()
        impostor.close()
