"""The master's Ollama-compatible endpoints, driven by the official `ollama` Python client and by
raw HTTP, against a real master serving SmolLM2 on two in-process devices."""
from __future__ import annotations

import json

import ollama
import pytest
import requests

from procs import client, master  # noqa: F401  (pytest fixtures)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def olla(master):
    return ollama.Client(host=master.url, timeout=120)


def test_lists_the_served_model(olla):
    models = olla.list().models
    assert [m.model for m in models] == ["smollm2:latest"]
    assert models[0].size > 0 and models[0].details.family == "llama"
    running = olla.ps().models
    assert [m.model for m in running] == ["smollm2:latest"]
    shown = olla.show("smollm2")
    assert "<|im_start|>" in shown.template
    assert shown.modelinfo["llama.block_count"] == 30


def test_chat_answers_paris_and_equals_the_openai_reply(olla, client):
    r = olla.chat(model="smollm2", messages=CAPITAL, options=GREEDY)
    assert r.done and r.done_reason == "stop"
    assert r.message.role == "assistant" and "Paris" in r.message.content
    assert r.prompt_eval_count > 0 and 0 < r.eval_count <= 24 and r.total_duration > 0
    same = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=24)
    assert r.message.content == same.choices[0].message.content


def test_streamed_chat_equals_the_non_streamed_reply(olla):
    full = olla.chat(model="smollm2:latest", messages=CAPITAL, options=GREEDY)
    parts = list(olla.chat(model="smollm2", messages=CAPITAL, options=GREEDY, stream=True))
    assert len(parts) > 3, "tokens arrive line by line"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == full.message.content
    assert parts[-1].eval_count == full.eval_count and parts[-1].done_reason == "stop"


def test_generate_streamed_and_not(olla, master):
    r = olla.generate(model="smollm2", prompt="The capital of France is", raw=True,
                      options={"temperature": 0, "num_predict": 6})
    assert "Paris" in r.response and r.done_reason == "length" and r.eval_count == 6
    streamed = list(olla.generate(model="smollm2", prompt="The capital of France is", raw=True,
                                  options={"temperature": 0, "num_predict": 6}, stream=True))
    assert "".join(p.response for p in streamed) == r.response
    # raw NDJSON: one JSON object per line, the content type Ollama clients expect
    resp = requests.post(master.url + "/api/generate", stream=True, timeout=60, json={
        "model": "smollm2", "prompt": "What is the capital of France?", "options": {"temperature": 0, "num_predict": 8}})
    assert resp.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[-1]["done"] is True and "Paris" in "".join(x["response"] for x in lines)


def test_requests_without_options_get_the_models_defaults(olla, client):
    """No options: the model's generation defaults (tpi.generation_config; SmolLM2's file names
    no sampling, so greedy), as on the OpenAI routes and in the web UI, not Ollama's own
    temperature 0.8 / top_k 40 / top_p 0.9; /api/show reports them."""
    assert olla.show("smollm2").parameters.split("\n") == ["temperature 0", "top_p 1", "top_k 0"]
    plain = olla.chat(model="smollm2", messages=CAPITAL, options={"num_predict": 24})
    greedy = olla.chat(model="smollm2", messages=CAPITAL, options=GREEDY)
    openai = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=24)
    assert plain.message.content == greedy.message.content == openai.choices[0].message.content
    assert "Paris" in plain.message.content
    prompt = "Once upon a time, in a land far away,"
    texts = {olla.generate(model="smollm2", prompt=prompt, raw=True, options=opts).response
             for opts in ({"num_predict": 24}, {"num_predict": 24, "temperature": 0})}
    assert len(texts) == 1, texts


def test_version_and_errors_in_ollama_shape(master, olla):
    assert requests.get(master.url + "/api/version", timeout=10).json()["version"]
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat(model="llama3", messages=CAPITAL)
    assert e.value.status_code == 404 and "llama3" in e.value.error
    r = requests.post(master.url + "/api/chat", json={"model": "smollm2", "messages": "hi"}, timeout=10)
    assert r.status_code == 400 and "messages" in r.json()["error"]
