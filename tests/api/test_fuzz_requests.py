"""Fuzzing the API's request validation against a real `tpi master` and a real `tpi webui`:
whatever the body, the answer is a 200 or a 4xx with an error object in the route's dialect
(OpenAI's, Ollama's), never a 5xx, and the servers keep serving. Routes: the OpenAI ones,
Ollama's /api/chat, /api/generate and /api/show, and the web UI's /api/chat. Fixed seed
(derandomize) and budget, so a run is repeatable."""
from __future__ import annotations

import json

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procs import master, webui  # noqa: F401  (pytest fixtures)

BUDGET = settings(derandomize=True, max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

numbers = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.booleans())
scalars = st.one_of(st.none(), numbers, st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)
roles = st.sampled_from(["user", "system", "assistant", "developer", "robot", ""])
message = st.one_of(st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=40), json_values)}),
                    json_values)
# Fields of a chat request, each either sensible or junk. max_tokens stays tiny when valid,
# so a body that passes validation costs one or two decode steps.
fields = {
    "messages": st.one_of(st.lists(message, max_size=3), json_values),
    "max_tokens": st.one_of(st.sampled_from([1, 2]), json_values),
    "temperature": st.one_of(st.floats(0, 2), json_values), "top_p": st.one_of(st.floats(0, 1), json_values),
    "top_k": json_values, "seed": json_values, "stop": json_values, "stream": json_values,
    "stream_options": json_values, "n": json_values, "model": st.one_of(st.just("smollm2"), json_values),
    "logprobs": json_values, "response_format": json_values, "presence_penalty": json_values,
}
chat_bodies = st.fixed_dictionaries({"messages": fields["messages"], "max_tokens": st.sampled_from([1, 2])},
                                    optional={k: v for k, v in fields.items() if k not in ("messages", "max_tokens")})
# Non-finite numbers and raw bytes: what a JSON encoder would not produce.
raw_bodies = st.one_of(st.binary(max_size=200),
                       st.integers(1, 50_000).map(lambda d: b'{"messages": ' + b"[" * d + b"]" * d + b"}"),
                       st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400"]).map(
                           lambda c: b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, '
                                     b'"temperature": ' + c + b"}"))


def post(master, path: str, data: bytes) -> requests.Response:
    return requests.post(master.url + path, data=data, timeout=120, headers={"Content-Type": "application/json"})


def assert_clean(r: requests.Response, ollama: bool = False) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400 and r.status_code != 413:  # 413 is the server's own, before the app
        err = r.json()["error"]
        if ollama:                                      # Ollama's shape: {"error": "message"}
            assert isinstance(err, str) and err, r.text[:300]
        else:
            assert set(err) == {"message", "type", "param", "code"}, r.text[:300]
    elif r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-300:]


@BUDGET
@given(body=chat_bodies)
def test_fuzzed_chat_bodies_get_200_or_4xx(master, body):
    assert_clean(post(master, "/v1/chat/completions", json.dumps(body).encode()))


@BUDGET
@given(body=raw_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzzed_raw_bodies_get_4xx(master, body, path):
    assert_clean(post(master, path, body))


@BUDGET
@given(body=st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=40), st.lists(numbers, max_size=4), json_values),
                                   "max_tokens": st.sampled_from([1, 2])},
                                  optional={k: v for k, v in fields.items() if k not in ("messages", "max_tokens")}))
def test_fuzzed_completion_bodies_get_200_or_4xx(master, body):
    assert_clean(post(master, "/v1/completions", json.dumps(body).encode()))


# Ollama bodies. A valid request always has a small num_predict: without one (or with a
# negative one) it would generate until the context is full.
no_long_reply = json_values.filter(lambda v: type(v) is not int)
options = st.one_of(
    st.fixed_dictionaries({"num_predict": st.one_of(st.sampled_from([1, 2]), no_long_reply)},
                          optional={"temperature": fields["temperature"], "top_p": fields["top_p"],
                                    "top_k": json_values, "seed": json_values, "stop": json_values,
                                    "num_ctx": json_values}),
    json_values.filter(lambda v: v is not None and not isinstance(v, dict)))
ollama_common = {"stream": json_values, "format": st.one_of(st.just("json"), json_values),
                 "tools": json_values, "keep_alive": json_values}
ollama_model = st.one_of(st.sampled_from(["smollm2", "smollm2:latest"]), json_values)
ollama_chat = st.fixed_dictionaries({"model": ollama_model, "messages": fields["messages"], "options": options},
                                    optional=ollama_common)
ollama_generate = st.fixed_dictionaries(
    {"model": ollama_model, "prompt": st.one_of(st.text(max_size=40), json_values), "options": options},
    optional={**ollama_common, "system": json_values, "raw": json_values, "images": json_values})
ollama_show = st.one_of(st.fixed_dictionaries({}, optional={"model": ollama_model, "name": ollama_model}),
                        json_values)


@BUDGET
@given(data=st.one_of(ollama_chat.map(lambda b: ("/api/chat", b)),
                      ollama_generate.map(lambda b: ("/api/generate", b)),
                      ollama_show.map(lambda b: ("/api/show", b))))
def test_fuzzed_ollama_bodies_get_200_or_4xx(master, data):
    path, body = data
    assert_clean(post(master, path, json.dumps(body).encode()), ollama=True)


@BUDGET
@given(body=raw_bodies, path=st.sampled_from(["/api/chat", "/api/generate", "/api/show"]))
def test_fuzzed_raw_ollama_bodies_get_4xx(master, body, path):
    assert_clean(post(master, path, body), ollama=True)


@BUDGET
@given(body=st.one_of(chat_bodies.map(lambda b: json.dumps(b).encode()), raw_bodies))
def test_fuzzed_web_ui_chat_bodies_get_200_or_4xx(webui, body):
    """The web UI's /api/chat as its own page posts it (same origin, JSON); it relays to the
    master's streamed chat, whose refusals it passes on."""
    assert_clean(post(webui, "/api/chat", body))
