"""Issue 16, finding 10, against real processes: a worker whose step replies carry a
malformed time breakdown (NaN or a string for seconds; tests/cluster/bad_breakdown_worker.py is
the real `tpi worker` with only that changed). The master refuses the reply as a protocol error naming
the cause, drops that worker, fails the request at once with a clear 503, keeps serving, and
answers again once a sound worker takes the rank. On a484dd1, before the hardening, the NaN
case fails (the reply is taken, NaN as a time); the string case already passed there (the
typed Reply of issue 13 refused it): docs/hardening-tests.md."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from procs import Server, free_port, start_worker

BAD_WORKER = Path(__file__).with_name("bad_breakdown_worker.py")
ASK = {"model": "smollm2", "max_tokens": 12, "temperature": 0,
       "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.mark.parametrize("bad", ["nan", "string"])
def test_a_malformed_breakdown_is_refused_and_serving_goes_on(tmp_path, bad):
    hub_port, token = free_port(), "bad-breakdown-token-16+"
    good = start_worker(hub_port, token, tmp_path, "good")
    bad_log = tmp_path / "bad.log"
    bad = subprocess.Popen([sys.executable, str(BAD_WORKER), bad, "worker", "--master", f"ws://127.0.0.1:{hub_port}",
                            "--join-token", token, "--name", "bad", "--timeout", "3"],
                           stdout=open(bad_log, "wb"), stderr=subprocess.STDOUT)
    http_port = free_port()
    master = Server("master", ["master", "--http", f"127.0.0.1:{http_port}", "--listen", f"127.0.0.1:{hub_port}",
                               "--devices", "3", "--join-token", token, "--timeout", "3", "--dtype", "float32"],
                    http_port, tmp_path)
    workers = [good, bad]
    try:
        master.wait_ready()
        t0 = time.monotonic()
        r = requests.post(master.url + "/v1/chat/completions", json=ASK, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "cluster_unavailable", r.text
        assert time.monotonic() - t0 < 10
        assert requests.get(master.url + "/healthz", timeout=10).ok
        assert "hub reported protocol: Reply" in bad_log.read_text()  # the hub told the worker why

        bad.kill()
        workers.append(start_worker(hub_port, token, tmp_path, "sound"))
        deadline = time.monotonic() + 120
        while True:
            r = requests.post(master.url + "/v1/chat/completions", json=ASK, timeout=120)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        master.stop()
        for w in workers:
            w.kill()
