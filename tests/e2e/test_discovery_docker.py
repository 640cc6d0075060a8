"""Discovery on a Docker network: a master container advertises its hub by mDNS, a worker
container given only the join token finds it (multicast crosses the bridge between
containers of one network), joins, downloads its shard from the master, and the pair produces
the same greedy text as `tpi generate` in one process on the host.

Uses the tpi image (TPI_IMAGE, default tpi:latest), built first by scripts/build-image.sh
unless TPI_E2E_BUILD=0, and a small random-weight Llama 3 model made on the host and mounted
read-only into the master. Skipped only when `docker info` fails. About a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import requests

from appliance import docker_info_error
from containers import PROMPT, Net, build_image, greedy, readable_copy, wait_healthy

_DOCKER_ERROR = docker_info_error()
pytestmark = [
    pytest.mark.skipif(_DOCKER_ERROR is not None, reason=f"no Docker engine (`docker info`: {_DOCKER_ERROR})"),
    pytest.mark.timeout(1200),
]
IMAGE = os.environ.get("TPI_IMAGE", "tpi:latest")


def test_a_worker_with_no_address_finds_the_master_on_a_docker_network(tiny_model):
    build_image(IMAGE)
    model = readable_copy(tiny_model("llama3"))
    net = Net("discovery")
    t0 = time.monotonic()
    try:
        master = net.master(IMAGE, model)
        worker = net.run(IMAGE, "worker", ["worker", "--join-token", net.token, "--name", "lan-1"])
        ip = net.ip(master)
        api = f"http://{ip}:8000"
        wait_healthy(api, master, timeout_s=600)
        ready_s = time.monotonic() - t0

        log = worker.logs().decode(errors="replace")
        assert f"on the LAN at ws://{ip}:29500" in log, log[-3000:]          # found by mDNS, not told
        assert f"joined ws://{ip}:29500 as rank 1 of 2" in log, log[-3000:]
        assert "downloading shard 1" in log, log[-3000:]     # no shared volume: fetched from the master
        served = greedy(api)
        alone = subprocess.run([sys.executable, "-m", "tpi_cli", "generate", "--model", str(model),
                                "--devices", "2", "--dtype", "float32", "--prompt", PROMPT,
                                "--max-new-tokens", "8", "--greedy", "--json"],
                               capture_output=True, text=True, timeout=300)
        assert alone.returncode == 0, alone.stderr[-2000:]
        assert served and served == json.loads(alone.stdout)["text"]
        devices = requests.get(api + "/api/cluster", timeout=10).json()["devices"]
        assert [d["name"] for d in devices] == ["master", "lan-1"]
        print(f"\n[discovery e2e] master + worker ready after {ready_s:.1f} s; text {served!r}")
    finally:
        net.close()
        shutil.rmtree(model.parent, ignore_errors=True)
