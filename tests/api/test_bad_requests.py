"""Bad input gets a clear OpenAI-style error, with the right status, and the master keeps
serving: after every bad request a normal one is answered."""
from __future__ import annotations

import json

import openai
import pytest
import requests

from procs import client, master  # noqa: F401  (pytest fixtures)

MSG = [{"role": "user", "content": "Hi"}]


def ok(**extra) -> dict:
    return {"messages": MSG, "max_tokens": 2, **extra}


# (name, route, raw body or JSON object, status, param, code)
CASES = [
    ("malformed JSON", "chat", b'{"messages": [', 400, None, "invalid_json"),
    ("empty body", "chat", b"", 400, None, "invalid_json"),
    ("body not an object", "chat", [1, 2], 400, None, "invalid_json"),
    ("missing messages", "chat", {"max_tokens": 2}, 400, "messages", "missing_required_parameter"),
    ("empty messages", "chat", {"messages": []}, 400, "messages", "empty_array"),
    ("messages not a list", "chat", {"messages": "Hi"}, 400, "messages", "invalid_type"),
    ("message not an object", "chat", {"messages": ["Hi"]}, 400, "messages[0]", "invalid_type"),
    ("message without content", "chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "invalid_type"),
    ("unknown role", "chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ("max_tokens zero", "chat", ok(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("max_tokens negative", "chat", ok(max_tokens=-5), 400, "max_tokens", "invalid_value"),
    ("max_tokens beyond the context", "chat", ok(max_tokens=100_000), 400, "max_tokens", "context_length_exceeded"),
    ("max_tokens a string", "chat", ok(max_tokens="10"), 400, "max_tokens", "invalid_type"),
    ("max_tokens a float", "chat", ok(max_tokens=2.5), 400, "max_tokens", "invalid_type"),
    ("max_tokens a boolean", "chat", ok(max_tokens=True), 400, "max_tokens", "invalid_type"),
    ("temperature a string", "chat", ok(temperature="hot"), 400, "temperature", "invalid_type"),
    ("temperature out of range", "chat", ok(temperature=5), 400, "temperature", "invalid_value"),
    ("top_p zero", "chat", ok(top_p=0), 400, "top_p", "invalid_value"),
    ("stream a string", "chat", ok(stream="yes"), 400, "stream", "invalid_type"),
    ("stop a number", "chat", ok(stop=5), 400, "stop", "invalid_type"),
    ("seed a string", "chat", ok(seed="x"), 400, "seed", "invalid_type"),
    ("n of 2", "chat", ok(n=2), 400, "n", "unsupported_parameter"),
    ("model a number", "chat", ok(model=3), 400, "model", "invalid_type"),
    ("unknown model", "chat", ok(model="gpt-4o"), 404, "model", "model_not_found"),
    ("prompt longer than the context", "chat",
     {"messages": [{"role": "user", "content": "hello " * 3000}], "max_tokens": 2}, 400, "messages",
     "context_length_exceeded"),
    ("temperature NaN", "chat", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
     400, None, "invalid_json"),
    ("top_p NaN", "chat", b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": NaN}', 400, None,
     "invalid_json"),
    ("temperature Infinity", "chat", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": -Infinity}',
     400, None, "invalid_json"),
    ("temperature overflowing to inf", "chat", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e400}',
     400, "temperature", "invalid_type"),
    ("seed 2**64", "chat", ok(seed=2 ** 64), 400, "seed", "invalid_value"),
    ("seed below int64", "chat", ok(seed=-(2 ** 63) - 1), 400, "seed", "invalid_value"),
    ("top_k beyond int32", "chat", ok(top_k=2 ** 40), 400, "top_k", "invalid_value"),
    ("a 5000-digit integer", "chat", b'{"messages": [{"role": "user", "content": "Hi"}], "seed": 1' + b"0" * 5000 + b"}",
     400, None, "invalid_json"),
    ("deeply nested JSON", "chat", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "invalid_json"),
    ("invalid UTF-8", "chat", b'{"messages": "' + bytes([0xff, 0xfe]) + b'"}', 400, None, "invalid_json"),
    ("completion without prompt", "completions", {"max_tokens": 2}, 400, "prompt", "missing_required_parameter"),
    ("completion prompt a number", "completions", {"prompt": 5, "max_tokens": 2}, 400, "prompt", "invalid_type"),
    ("completion empty prompt", "completions", {"prompt": "", "max_tokens": 2}, 400, "prompt", "empty_prompt"),
    ("completion token id out of range", "completions", {"prompt": [1, 10_000_000], "max_tokens": 2}, 400,
     "prompt", "invalid_value"),
]


def post(master, route: str, body) -> requests.Response:
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(master.url + path, data=data, timeout=60,
                         headers={"Content-Type": "application/json"})


def assert_still_serving(master):
    r = post(master, "chat", ok())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("name,route,body,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_and_the_server_keeps_serving(master, name, route, body, status, param, code):
    r = post(master, route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    assert_still_serving(master)


def test_streaming_request_with_bad_input_is_refused_before_streaming(master):
    r = post(master, "chat", ok(max_tokens=0, stream=True))
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/json")
    assert_still_serving(master)


def test_unknown_route_and_wrong_method(master):
    r = requests.get(master.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(master.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    r = requests.get(master.url + "/v1/models/gpt-4o", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert_still_serving(master)


def test_openai_client_sees_typed_errors(client, master):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=0)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MSG, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[], max_tokens=2)
    assert_still_serving(master)
