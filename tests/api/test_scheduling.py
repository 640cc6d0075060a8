"""Request scheduling in a real master: concurrent requests decode together and give the
same greedy text as run one after another; a client that disconnects stops its generation;
requests beyond the free slots queue with a visible position."""
from __future__ import annotations

import json
import socket
import threading

import requests

from procs import master, metric, wait_for  # noqa: F401  (master: a pytest fixture)

PROMPTS = ["What is the capital of France?", "Write a poem about the sea.",
           "Count from 1 to 20.", "Explain gravity to a child."]
LONG = {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
        "max_tokens": 400, "ignore_eos": True}


def chat(master, text: str, max_tokens: int = 24) -> requests.Response:
    return requests.post(master.url + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens})


def metrics(master) -> str:
    return requests.get(master.url + "/metrics", timeout=10).text


def scheduler(master) -> dict:
    return requests.get(master.url + "/api/cluster", timeout=10).json()["scheduler"]


def test_concurrent_requests_batch_and_match_sequential(master):
    before = metrics(master)
    alone = [chat(master, p).json()["choices"][0]["message"]["content"] for p in PROMPTS]
    mid = metrics(master)
    # one at a time: every decode step carried one sequence
    assert metric(mid, "tpi_decode_rows_total") - metric(before, "tpi_decode_rows_total") == \
        metric(mid, "tpi_decode_steps_total") - metric(before, "tpi_decode_steps_total")

    together: dict[int, str] = {}
    start = threading.Barrier(len(PROMPTS))

    def ask(i):
        start.wait()
        together[i] = chat(master, PROMPTS[i]).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = metrics(master)
    assert [together[i] for i in range(len(PROMPTS))] == alone
    steps = metric(after, "tpi_decode_steps_total") - metric(mid, "tpi_decode_steps_total")
    rows = metric(after, "tpi_decode_rows_total") - metric(mid, "tpi_decode_rows_total")
    assert rows / steps > 1.5, f"requests did not decode together ({rows} rows in {steps} steps)"


def test_streaming_client_disconnect_cancels_generation(master):
    before = metrics(master)
    resp = requests.post(master.url + "/v1/chat/completions", json={**LONG, "stream": True}, stream=True, timeout=60)
    seen = 0
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            seen += 1
            if seen == 4:
                break
    resp.close()
    assert wait_for(lambda: not scheduler(master)["active"], timeout_s=10), "generation kept running"
    last = scheduler(master)["recent"][0]
    assert last["finish_reason"] == "cancelled"
    assert last["completion_tokens"] < 100
    after = metrics(master)
    key = 'tpi_generations_total{reason="cancelled"}'
    assert metric(after, key) == metric(before, key) + 1
    assert metric(after, "tpi_generated_tokens_total") - metric(before, "tpi_generated_tokens_total") < 100


def test_non_streaming_client_disconnect_cancels_generation(master):
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", master.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_for(lambda: any(a["completion_tokens"] > 2 for a in scheduler(master)["active"]), 30)
    assert wait_for(lambda: not scheduler(master)["active"], timeout_s=10), "generation kept running"
    last = scheduler(master)["recent"][0]
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < 100


def test_requests_beyond_the_slots_queue_with_a_visible_position(master):
    slots = scheduler(master)["slots"]
    streams = []
    try:
        for _ in range(slots):
            streams.append(requests.post(master.url + "/v1/chat/completions", json={**LONG, "stream": True},
                                         stream=True, timeout=60))
        assert wait_for(lambda: len(scheduler(master)["active"]) == slots, timeout_s=30)
        queued = requests.post(master.url + "/v1/chat/completions", json={**LONG, "stream": True},
                               stream=True, timeout=60)
        streams.append(queued)
        assert queued.status_code == 200 and int(queued.headers["X-Queue-Position"]) == 1
        state = scheduler(master)
        assert state["queue_depth"] == 1 and state["waiting"][0]["position"] == 1
        assert "tpi_queue_depth 1" in metrics(master)
        lines = queued.iter_lines()
        assert next(line for line in lines if line.startswith(b":") and b"queue" in line) == b": queue position 1"
        streams[0].close()  # a slot frees up: the queued request starts and streams tokens
        assert any(line.startswith(b"data: ") and b'"delta":{"content"' in line for line in lines)
        state = scheduler(master)
        assert state["queue_depth"] == 0, state
    finally:
        for s in streams:
            s.close()
    assert wait_for(lambda: not scheduler(master)["active"], timeout_s=15)
