"""A master and workers as plain containers of the tpi image on a Docker network of their own
(no Compose, no registry), serving a small model made on the host. Used by the discovery and
arm64 tests (tests/e2e/test_discovery_docker.py, tests/e2e/test_arm64_worker.py)."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from appliance import ARTIFACTS, REPO

PROMPT = "The capital of France is"


def build_image(image: str, *args: str) -> None:
    """scripts/build-image.sh (seconds when cached) unless TPI_E2E_BUILD=0."""
    if os.environ.get("TPI_E2E_BUILD", "1") == "0":
        return
    r = subprocess.run(["bash", "scripts/build-image.sh", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=3600, env={**os.environ, "IMAGE": image})
    assert r.returncode == 0, f"scripts/build-image.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def readable_copy(model: Path) -> Path:
    """A copy of a model directory that the image's user (uid 10001) can read (pytest's own
    temporary directories are private to root). The caller removes its parent."""
    d = Path(tempfile.mkdtemp(prefix="tpi-e2e-model-"))
    copy = Path(shutil.copytree(model, d / "model"))
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return copy


class Net:
    """A bridge network with containers on it; close() dumps their logs to artifacts/ and
    removes them."""

    def __init__(self, label: str):
        import docker

        self.client = docker.from_env()
        self.tag, self.token = secrets.token_hex(3), secrets.token_urlsafe(24)
        self.label = label
        self.network = self.client.networks.create(f"tpi-{label}-{self.tag}", driver="bridge")
        self.containers: list = []

    def run(self, image: str, name: str, command: list[str], **kw):
        c = self.client.containers.run(image, name=f"tpi-{self.label}-{name}-{self.tag}", network=self.network.name,
                                       detach=True, command=command, **kw)
        self.containers.append(c)
        return c

    def master(self, image: str, model: Path, name: str = "master", *extra: str):
        """`tpi master` for 2 devices (one worker), float32, the model mounted read-only."""
        return self.run(image, name, ["master", "--model", "/model", "--devices", "2", "--dtype", "float32",
                                      "--listen", "0.0.0.0:29500", "--http", "0.0.0.0:8000",
                                      "--join-token", self.token, *extra],
                        volumes={str(model): {"bind": "/model", "mode": "ro"}})

    def ip(self, container) -> str:
        container.reload()
        return container.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"]

    def close(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        with open(ARTIFACTS / f"e2e-{self.label}-{self.tag}.log", "w") as f:
            for c in self.containers:
                f.write(f"==== {c.name}\n{c.logs().decode(errors='replace')}\n")
        for c in self.containers:
            c.remove(force=True)
        self.network.remove()


def wait_healthy(api: str, master, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        master.reload()
        if master.status == "exited":
            raise AssertionError(f"the master exited:\n{master.logs().decode(errors='replace')[-3000:]}")
        try:
            if requests.get(api + "/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the master is not ready after {timeout_s} s:\n{master.logs().decode(errors='replace')[-3000:]}")


def greedy(api: str, max_tokens: int = 8) -> str:
    """The master's greedy continuation of PROMPT through its completions API."""
    r = requests.post(api + "/v1/completions", timeout=600, json={
        "model": "/model", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]
