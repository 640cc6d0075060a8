"""A worker that registers while the master is idle joins the plan without any request
(real Redis, real `tpi master --registry` and `tpi worker` processes)."""
from __future__ import annotations

import time

import requests

from procs import Server, free_port
from test_registry_cluster import TOKEN, pytestmark, start_redis, start_worker  # noqa: F401

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_worker_registering_while_idle_is_admitted_without_a_request(tmp_path):
    rport, hub, http = free_port(), free_port(), free_port()
    redis_proc = start_redis(rport)
    registry = f"redis://127.0.0.1:{rport}/0"
    master = Server("master", ["master", "--registry", registry, "--join-token", TOKEN,
                               "--listen", f"127.0.0.1:{hub}", "--advertise", "127.0.0.1",
                               "--http", f"127.0.0.1:{http}", "--min-workers", "0", "--dtype", "float32",
                               "--timeout", "3"], http, tmp_path)
    worker = None
    try:
        master.wait_ready()
        assert requests.get(master.url + "/api/cluster", timeout=10).json()["world_size"] == 1
        worker = start_worker(registry, tmp_path, "late")
        deadline = time.monotonic() + 180
        while (status := requests.get(master.url + "/api/cluster", timeout=10).json())["world_size"] != 2:
            assert time.monotonic() < deadline, f"not admitted while idle: {status['devices_in_plan']}"
            assert worker.poll() is None, (tmp_path / "late.log").read_text()[-2000:]
            time.sleep(1)
        assert status["devices_in_plan"] == ["master", "late"]
        metrics = requests.get(master.url + "/metrics", timeout=10).text
        assert 'tpi_http_requests_total{route="/v1/chat/completions"' not in metrics  # no request did it
        r = requests.post(master.url + "/v1/chat/completions", timeout=300,
                          json={"messages": QUESTION, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        master.stop()
        if worker is not None:
            worker.kill()
        redis_proc.kill()
