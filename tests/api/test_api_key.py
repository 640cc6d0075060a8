"""A master started with --api-key refuses /v1/* and /api/* without the right Bearer key;
/healthz and /metrics stay open for probes and scrapers."""
from __future__ import annotations

import openai
import pytest
import requests

from procs import start_master

KEY = "s3cret-key"
MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def keyed_master(tmp_path_factory):
    server = start_master(tmp_path_factory.mktemp("keyed"), "--api-key", KEY)
    yield server
    server.stop()


def client_with(url: str, key: str):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_missing_key_is_refused(keyed_master):
    r = requests.post(keyed_master.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(keyed_master.url + "/api/cluster", timeout=10).status_code == 401
    assert requests.get(keyed_master.url + "/v1/models", timeout=10).status_code == 401


def test_wrong_key_is_refused(keyed_master):
    with pytest.raises(openai.AuthenticationError) as e:
        client_with(keyed_master.url, "wrong").chat.completions.create(model="smollm2", messages=MSG, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = requests.get(keyed_master.url + "/v1/models", headers={"Authorization": "Basic " + KEY}, timeout=10)
    assert r.status_code == 401


def test_right_key_is_served(keyed_master):
    r = client_with(keyed_master.url, KEY).chat.completions.create(model="smollm2", messages=MSG, max_tokens=2)
    assert r.choices[0].message.role == "assistant"
    r = requests.get(keyed_master.url + "/api/cluster", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200 and r.json()["world_size"] == 2


def test_health_and_metrics_need_no_key(keyed_master):
    assert requests.get(keyed_master.url + "/healthz", timeout=10).status_code == 200
    r = requests.get(keyed_master.url + "/metrics", timeout=10)
    assert r.status_code == 200 and 'code="401"' in r.text


def test_ollama_endpoints_take_the_same_key(keyed_master):
    import ollama

    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=keyed_master.url).list()
    assert refused.value.status_code == 401
    keyed = ollama.Client(host=keyed_master.url, headers={"Authorization": f"Bearer {KEY}"})
    assert [m.model for m in keyed.list().models] == ["smollm2:latest"]
    r = keyed.chat(model="smollm2", messages=MSG, options={"num_predict": 2, "temperature": 0})
    assert r.done and r.eval_count == 2
