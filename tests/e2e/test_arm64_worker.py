"""An arm64 worker, emulated (QEMU user mode), joins an amd64 master and produces the same
greedy text as an amd64 worker: the steps of docs/join-a-device.md, "An arm64 worker on an
amd64 machine".

  1. tpi:latest (amd64, torch 2.13.0) and tpi:arm64 (linux/arm64, torch 2.10.0: PyPI's last
     CPU-only aarch64 wheel), built by `.ci/run` or by hand with the documented steps;
  2. an amd64 master and an amd64 worker on a Docker network -> greedy text A;
  3. an amd64 master and the arm64 worker (`docker run --platform linux/arm64`) -> text B;
  4. A == B, the worker really ran aarch64 with torch 2.10.0, and each image's size and the
     test's timings go to artifacts/e2e-arm64.json.

Emulated torch is slow, and building the arm64 image takes long: the test runs only with
TPI_ARM64=1, which .ci/run sets when Dockerfile.worker or pyproject.toml changed in the last
commit (docs/ci.md); it then fails, not skips, if the arm64 image is missing.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time

import pytest

from appliance import ARTIFACTS, docker_info_error
from containers import Net, greedy, readable_copy, wait_healthy

ARM64_IMAGE = os.environ.get("TPI_ARM64_IMAGE", "tpi:arm64")
IMAGE = os.environ.get("TPI_IMAGE", "tpi:latest")
_DOCKER_ERROR = docker_info_error()
pytestmark = [
    pytest.mark.skipif(os.environ.get("TPI_ARM64") != "1",
                       reason="set TPI_ARM64=1 to run the emulated arm64 worker (.ci/run does when "
                              "Dockerfile.worker or pyproject.toml change)"),
    pytest.mark.skipif(_DOCKER_ERROR is not None, reason=f"no Docker engine (`docker info`: {_DOCKER_ERROR})"),
    pytest.mark.timeout(3600),
]


def pair_text(model, worker_image: str, label: str, platform_: str | None, figures: dict) -> str:
    """A master (amd64) and one worker of `worker_image` on a fresh network: the greedy text."""
    net = Net(label)
    t0 = time.monotonic()
    try:
        master = net.master(IMAGE, model)
        worker = net.run(worker_image, "worker", ["worker", "--master", f"ws://{master.name}:29500",
                                                  "--join-token", net.token, "--name", label],
                         platform=platform_)
        api = f"http://{net.ip(master)}:8000"
        wait_healthy(api, master, timeout_s=1800)
        figures[f"{label}_ready_s"] = round(time.monotonic() - t0, 1)
        t1 = time.monotonic()
        text = greedy(api)
        figures[f"{label}_8_tokens_s"] = round(time.monotonic() - t1, 1)
        assert f"joined ws://{master.name}:29500 as rank 1 of 2" in worker.logs().decode(errors="replace")
        return text
    finally:
        net.close()


def test_an_emulated_arm64_worker_gives_the_amd64_tokens(tiny_model):
    import docker

    client = docker.from_env()
    images = {}
    for tag, arch in ((IMAGE, "amd64"), (ARM64_IMAGE, "arm64")):
        try:
            img = client.images.get(tag)
        except docker.errors.ImageNotFound:
            pytest.fail(f"no image {tag}: build it as docs/join-a-device.md says (.ci/run does)")
        assert img.attrs["Architecture"] == arch, f"{tag} is {img.attrs['Architecture']}, not {arch}"
        images[arch] = {"tag": tag, "bytes": img.attrs["Size"]}
    figures: dict = {"host": platform.machine(), "images": images}
    t0 = time.monotonic()
    probe = client.containers.run(ARM64_IMAGE, entrypoint="python", platform="linux/arm64", remove=True, command=[
        "-c", "import platform, torch, tpi; print(platform.machine(), torch.__version__)"]).decode().split()
    figures["arm64_python_torch_import_s"] = round(time.monotonic() - t0, 1)
    assert probe[0] == "aarch64" and probe[1].startswith("2.10.0"), probe
    figures["arm64_torch"] = probe[1]

    model = readable_copy(tiny_model("llama3"))
    try:
        amd64 = pair_text(model, IMAGE, "amd64", None, figures)
        arm64 = pair_text(model, ARM64_IMAGE, "arm64", "linux/arm64", figures)
    finally:
        shutil.rmtree(model.parent, ignore_errors=True)
    figures["test_s"] = round(time.monotonic() - t0, 1)
    figures["text"] = {"amd64": amd64, "arm64": arm64}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "e2e-arm64.json").write_text(json.dumps(figures, indent=2))
    print(f"\n[arm64 e2e] {json.dumps(figures)}")
    assert amd64 and arm64 == amd64
