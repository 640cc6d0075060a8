"""The master and workers as real processes over loopback WebSockets."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from procs import Server, free_port, start_worker

PROMPT = ["--prompt", "The history of the Roman Empire", "--max-new-tokens", "24", "--greedy",
          "--dtype", "float32", "--json"]


def generate(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tpi_cli", "generate", *PROMPT, *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("devices", [2, 3, 4, 5])
def test_ws_tokens_equal_inproc(devices):
    inproc = generate("--devices", str(devices), "--transport", "inproc")
    ws = generate("--devices", str(devices), "--transport", "ws")
    assert ws["tokens"] == inproc["tokens"]
    assert ws["transport"] == "ws" and ws["world_size"] == devices
    # every device reports its own peak memory: these are separate processes
    assert all(d["peak_rss_bytes"] for d in ws["devices"])


@pytest.mark.parametrize("allreduce", ["ring", "gloo"])
def test_ring_and_gloo_tokens_equal_inproc(allreduce):
    """The baselines' output head: the candidates' gather rides on an all-reduce of a
    zero-padded tensor there (Communicator.gather's default), with the same tokens."""
    inproc = generate("--devices", "3", "--transport", "inproc")
    ws = generate("--devices", "3", "--transport", "ws", "--allreduce", allreduce)
    assert ws["tokens"] == inproc["tokens"]


def test_worker_killed_mid_generation_fails_fast_then_recovers(tmp_path):
    hub_port, token = free_port(), "kill-test-token-16+"
    workers = [start_worker(hub_port, token, tmp_path, f"w{i}") for i in (1, 2)]
    http_port = free_port()
    master = Server("master", ["master", "--http", f"127.0.0.1:{http_port}", "--listen", f"127.0.0.1:{hub_port}",
                               "--devices", "3", "--join-token", token, "--timeout", "3", "--dtype", "float32"],
                    http_port, tmp_path)
    try:
        master.wait_ready()
        body = {"model": "smollm2", "stream": True, "max_tokens": 200, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}
        seen, error, killed_at = 0, None, None
        with requests.post(master.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    break
                seen += 1
                if seen == 5:
                    workers[0].kill()  # SIGKILL in the middle of the reply
                    killed_at = time.monotonic()
        assert killed_at is not None, "the reply ended before the worker could be killed"
        assert error is not None, "the stream did not report the lost worker"
        assert time.monotonic() - killed_at < 5.0
        assert "rank" in error["message"] or "worker" in error["message"] or "disconnect" in error["message"]

        workers[0] = start_worker(hub_port, token, tmp_path, "w1-again")
        deadline = time.monotonic() + 120
        while True:
            r = requests.post(master.url + "/v1/chat/completions", timeout=120, json={
                "model": "smollm2", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]})
            if r.status_code == 200:
                break
            assert time.monotonic() < deadline, f"no recovery: {r.status_code} {r.text}"
            time.sleep(1)
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        master.stop()
        for w in workers:
            w.kill()
