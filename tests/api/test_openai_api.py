"""The master's OpenAI-compatible API, driven by the official `openai` client and by raw
HTTP, against a real master serving SmolLM2 on two in-process devices."""
from __future__ import annotations

import json
import re
import threading
import time

import requests

from procs import client, master  # noqa: F401  (pytest fixtures)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"


def test_chat_answers_paris(client):
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=24)
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streamed_chat_equals_the_non_streamed_reply(client):
    full = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert len(pieces) > 2, "tokens arrive one by one, not as one block"
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == "stop"
    assert usage.completion_tokens == full.usage.completion_tokens


def test_stream_is_server_sent_events_ending_with_done(master):
    r = requests.post(master.url + "/v1/chat/completions", stream=True, timeout=60, json={
        "messages": CAPITAL, "temperature": 0, "max_tokens": 8, "stream": True})
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["X-Queue-Position"] == "0" and r.headers["X-Request-Id"]
    data = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    first = json.loads(data[0])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(data[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_endpoint(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=6)
    assert r.object == "text_completion"
    assert "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=6, stream=True)
        if c.choices)
    assert streamed == r.choices[0].text


def test_stop_string_ends_the_reply_before_it(client):
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=24,
                                       stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.startswith("The capital of France is")
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def once():
        return client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=1.0, top_p=0.9,
                                              seed=7, max_tokens=12).choices[0].message.content
    assert once() == once()


def test_healthz(master):
    h = requests.get(master.url + "/healthz", timeout=5).json()
    assert h["status"] == "ok" and h["devices"] == 2 and h["slots"] >= 2


def test_metrics_are_prometheus_text(master, client):
    client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=4)
    r = requests.get(master.url + "/metrics", timeout=5)
    assert r.headers["Content-Type"].startswith("text/plain")
    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [-+0-9.eInf]+$')
    for line in r.text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    text = r.text
    for name in ("tpi_http_requests_total", "tpi_generated_tokens_total", "tpi_queue_depth",
                 "tpi_request_duration_seconds_bucket", "tpi_time_to_first_token_seconds_count"):
        assert name in text
    assert 'tpi_http_requests_total{route="/v1/chat/completions",code="200"}' in text


def test_cluster_status_lists_devices_and_last_request_breakdown(master, client):
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=8)
    status = requests.get(master.url + "/api/cluster", timeout=5).json()
    assert status["world_size"] == 2 and [d["rank"] for d in status["devices"]] == [0, 1]
    for d in status["devices"]:
        assert d["memory"]["used_bytes"] > 0 and d["memory"]["kv_cache_bytes"] > 0
        assert "budget_bytes" in d["memory"] and "rtt_ms" in d["link"]
        f = d["last_forward"]
        assert set(f) == {"compute_s", "comm_s", "disk_wait_s", "attention_s", "mlp_s"}
        assert 0 < f["attention_s"] and 0 < f["mlp_s"] and f["attention_s"] + f["mlp_s"] <= f["compute_s"]
    heads = [d["shard"]["q_heads"] for d in status["devices"]]
    assert heads[0][0] == 0 and heads[-1][1] == status["model"]["heads"]
    last = status["scheduler"]["last_request"]
    assert last["completion_tokens"] == r.usage.completion_tokens
    # the prefill made the first token, each decode step one or more (accepted drafts); the
    # step that produced the stop token, when the reply stopped by itself, gained none
    steps = last["per_token"]
    assert steps[0]["prefill"] and not any(s["prefill"] for s in steps[1:])
    assert steps[0]["tokens"] == 1 and sum(s["tokens"] for s in steps) == last["completion_tokens"]
    assert all(s["tokens"] >= 1 for s in steps[:-1])
    assert all(len(s["devices"]) == 2 and all(len(dev) == 3 for dev in s["devices"]) for s in steps)
    assert sum(dev[0] for s in steps for dev in s["devices"]) > 0  # compute time was measured


def test_status_answers_while_a_long_reply_generates(master):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 120,
            "ignore_eos": True, "stream": True}
    resp = requests.post(master.url + "/v1/chat/completions", json=body, stream=True, timeout=120)
    lines = resp.iter_lines()
    try:
        worst = 0.0
        got = 0
        for line in lines:  # wait until it is decoding
            if line.startswith(b"data: "):
                got += 1
                if got > 3:
                    break
        for _ in range(10):
            for path in ("/healthz", "/api/cluster", "/metrics"):
                t0 = time.perf_counter()
                assert requests.get(master.url + path, timeout=5).status_code == 200
                worst = max(worst, time.perf_counter() - t0)
        assert worst < 1.0, f"a status request took {worst:.2f} s during generation"
        status = requests.get(master.url + "/api/cluster", timeout=5).json()
        assert len(status["scheduler"]["active"]) == 1
    finally:
        resp.close()


def test_many_clients_at_once_are_all_served(master):
    """More concurrent requests than sequence slots: all complete."""
    results: dict[int, int] = {}
    bodies: dict[int, str] = {}

    def ask(i):
        r = requests.post(master.url + "/v1/chat/completions", timeout=180, json={
            "messages": [{"role": "user", "content": f"Say the number {i}."}], "temperature": 0, "max_tokens": 6})
        results[i], bodies[i] = r.status_code, r.text[:300]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: 200 for i in range(7)}, bodies
