"""A cluster assembled through a real Redis registry: join, re-plan, recovery from a worker
killed mid-generation with identical greedy output (SmolLM2, a Qwen3-MoE and a Gemma 3 GGUF
file), a wrong token, a Redis outage."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import requests

from procs import Server, free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
TOKEN = "registry-cluster-token"
QUESTION = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            import redis

            if redis.Redis(port=port).ping():
                return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    raise RuntimeError("redis-server did not start")


def start_worker(registry: str, log_dir, name: str, token: str = TOKEN, *extra: str) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "tpi_cli", "worker", "--registry", registry,
                             "--join-token", token, "--name", name, "--timeout", "3", *extra],
                            stdout=log, stderr=subprocess.STDOUT)


def plan_devices(master) -> list[str]:
    """The master first, then its workers by name (their ranks follow the order they joined)."""
    devices = requests.get(master.url + "/api/cluster", timeout=10).json()["devices_in_plan"]
    assert devices[0] == "master"
    return ["master", *sorted(devices[1:])]


def chat(master, stream: bool, max_tokens: int = 64, on_chunk=None) -> str:
    body = {"messages": QUESTION, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    r = requests.post(master.url + "/v1/chat/completions", json=body, stream=stream, timeout=300)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    text, chunks = "", 0
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        text += event["choices"][0]["delta"].get("content") or ""
        chunks += 1
        if on_chunk:
            on_chunk(chunks)
    return text


def start_registry_master(registry: str, log_dir, dtype: tuple[str, ...] = ("--dtype", "float32")) -> Server:
    """A master that finds its (two or more) workers through the registry; not yet ready."""
    hub, http = free_port(), free_port()
    return Server("master", ["master", "--registry", registry, "--join-token", TOKEN,
                             "--listen", f"127.0.0.1:{hub}", "--advertise", "127.0.0.1",
                             "--http", f"127.0.0.1:{http}", "--min-workers", "2", *dtype,
                             "--timeout", "3"], http, log_dir)


# The embedded SmolLM2 is a GGUF source: dequantized to float32, or kept in its own types (the
# quantized group forms in the store, in the download and in memory), computed from them in
# float32 (`--compute-dtype float32`: exact, so a recovered reply equals the uninterrupted one;
# the default int4 kernel's bfloat16 outputs round differently on 2 devices than on 3).
STORES = {"float32": ("--dtype", "float32"), "gguf": ("--dtype", "gguf", "--compute-dtype", "float32")}
# The families from GGUF files of tiny random-weight models (tests/gguf_models.py), kept in
# their own types the same way: a mixture of experts (5 experts over 3, then 2 devices) and
# Gemma 3 (local and global layers, a window shorter than the prompt).
FAMILY_FILES = {"qwen3_moe": "Q4_K", "gemma3": "Q8_0"}


def master_args(request) -> tuple[str, ...]:
    store = getattr(request, "param", "float32")
    if store in STORES:
        return STORES[store]
    path = request.getfixturevalue("gguf_model")(store, FAMILY_FILES[store])
    return ("--model", str(path), *STORES["gguf"])


@pytest.fixture
def cluster(tmp_path, request):
    rport = free_port()
    redis_proc = start_redis(rport)
    registry = f"redis://127.0.0.1:{rport}/0"
    workers = [start_worker(registry, tmp_path, f"w{i}") for i in (1, 2)]
    master = start_registry_master(registry, tmp_path, master_args(request))
    state = {"redis": redis_proc, "rport": rport, "registry": registry, "workers": workers,
             "master": master, "dir": tmp_path}
    try:
        master.wait_ready()
        yield state
    finally:
        master.stop()
        for w in state["workers"]:
            w.kill()
        state["redis"].kill()


@pytest.mark.parametrize("cluster", [*STORES, *FAMILY_FILES], indirect=True)
def test_join_kill_recover_rejoin(cluster):
    master = cluster["master"]
    assert plan_devices(master) == ["master", "w1", "w2"]
    reference = chat(master, stream=False)
    assert reference.strip(), "an empty reply proves nothing"

    killed = {}

    def kill_midway(chunks):
        if chunks == 10 and not killed:
            cluster["workers"][0].kill()  # SIGKILL, mid-generation
            killed["at"] = time.monotonic()

    recovered = chat(master, stream=True, on_chunk=kill_midway)
    assert killed, "the reply ended before the worker could be killed"
    assert recovered == reference  # same greedy tokens as the uninterrupted run
    assert plan_devices(master) == ["master", "w2"]

    # the newcomer does not use the shared store: it downloads its shard from the master
    cluster["workers"][0] = start_worker(cluster["registry"], cluster["dir"], "w3", TOKEN, "--download")
    deadline = time.monotonic() + 90
    while plan_devices(master) != ["master", "w2", "w3"]:
        assert time.monotonic() < deadline, f"w3 never joined the plan: {plan_devices(master)}"
        chat(master, stream=False, max_tokens=4)  # re-plans happen between requests
        time.sleep(1)
    assert chat(master, stream=False) == reference
    assert "files downloaded" in (cluster["dir"] / "w3.log").read_text()


def test_wrong_token_refused(cluster):
    """Never admitted, and told why; it keeps running, since a refusal its token cannot
    verify could have been written by anyone with Redis access (tests/registry/test_registry_junk.py)."""
    bad = start_worker(cluster["registry"], cluster["dir"], "intruder", token="not-the-right-token-at-all")
    log_path = cluster["dir"] / "intruder.log"
    try:
        deadline = time.monotonic() + 60
        while "that this worker's join token does not verify" not in log_path.read_text():
            assert bad.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.5)
        assert bad.poll() is None
    finally:
        bad.kill()
    log = log_path.read_text()
    assert "--join-token" in log
    assert "intruder" not in plan_devices(cluster["master"])


def test_redis_outage_while_serving(cluster):
    master = cluster["master"]
    cluster["redis"].kill()
    cluster["redis"].wait()
    assert "Paris" in chat_capital(master)          # serves with its current plan
    cluster["redis"] = start_redis(cluster["rport"])  # back, empty: everyone re-registers
    time.sleep(8)
    assert "Paris" in chat_capital(master)
    assert plan_devices(master) == ["master", "w1", "w2"]


def chat_capital(master) -> str:
    r = requests.post(master.url + "/v1/chat/completions", timeout=120, json={
        "model": "smollm2", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]
