"""JSON mode and log probabilities through the official `openai` client against a real
master serving SmolLM2 (float32, two devices); prompt log probabilities are checked against
the Hugging Face float32 model."""
from __future__ import annotations

import json
import math

import openai
import pytest
import requests
import torch

from procs import client, master  # noqa: F401  (pytest fixtures)

ASKS = ["Describe a cat as JSON.", "List three fruits with their colours.", "Hello!",
        "Write a poem about the sea."]   # the last two do not ask for JSON: the constraint still holds
SCHEMA = {"type": "json_schema", "json_schema": {"name": "city", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "population": {"type": "integer"}}}}}


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.95, seed=7),
                                      dict(temperature=1.3, seed=3)])
def test_json_mode_output_always_parses(client, sampling):
    for i, ask in enumerate(ASKS):
        fmt = SCHEMA if i % 2 else {"type": "json_object"}
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": ask}],
                                           max_tokens=12 + 20 * i, response_format=fmt, **sampling)
        obj = json.loads(r.choices[0].message.content)
        assert isinstance(obj, dict), r.choices[0].message.content
        if fmt is SCHEMA:      # its keys, in order, with their types
            assert list(obj) == ["name", "population"], obj
            assert isinstance(obj["name"], str) and isinstance(obj["population"], int), obj
        assert r.choices[0].finish_reason == "stop"


NESTED = {"type": "object", "required": ["name", "country", "districts", "mayor"], "properties": {
    "name": {"type": "string"}, "country": {"enum": ["France", "Italy", "Spain"]},
    "districts": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "required": ["name", "population"],
        "properties": {"name": {"type": "string"}, "population": {"type": "integer"}}}},
    "mayor": {"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}]}},
    "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"}, "since": {"type": "integer"}}}}}


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.95, seed=7),
                                      dict(temperature=1.3, seed=3)])
def test_nested_json_schema_output_validates(client, sampling):
    """Nested objects, an array of objects with bounds, an enum, a $ref and anyOf: the reply
    validates against the schema (the `jsonschema` package), greedy and sampled, streamed too."""
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": NESTED}}
    for ask in ["Describe Paris and two of its districts as JSON.", "Write a poem about the sea."]:
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": ask}],
                                           max_tokens=90, response_format=fmt, **sampling)
        jsonschema.validate(json.loads(r.choices[0].message.content), NESTED)
        assert r.choices[0].finish_reason == "stop"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Rome as JSON."}], max_tokens=90, stream=True,
        response_format=fmt, **sampling) if c.choices]
    jsonschema.validate(json.loads("".join(parts)), NESTED)


def test_a_schema_without_a_finite_instance_is_refused(client):
    loop = {"type": "object", "required": ["next"], "properties": {"next": {"$ref": "#"}}}
    with pytest.raises(openai.BadRequestError, match="no instance"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": loop}})


def test_streamed_json_mode_parses(client):
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "A JSON object about Paris."}],
        max_tokens=40, temperature=0.8, seed=1, stream=True, response_format={"type": "json_object"}) if c.choices]
    assert isinstance(json.loads("".join(parts)), dict)


def test_chat_logprobs_match_the_tokens(client):
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token          # greedy: the chosen token is the best
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    streamed = [lp for c in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
        logprobs=True, stream=True) if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(streamed, content))


def test_echo_scores_the_prompt_like_transformers(master, smollm2_dir):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs=1, max_tokens=1, token ids.
    Expected values: the Hugging Face float32 logits with the documented approximation applied
    (tpi.generation.logprobs): normalized over each device's top 128 of its vocabulary slice;
    a token outside them gets the largest of the devices' 128th logits."""
    from transformers import AutoModelForCausalLM

    from tpi.config import load_model_config
    from tpi.plan import make_plan
    from tpi.tokenizer import ChatTokenizer

    ids = ChatTokenizer(smollm2_dir).encode("The capital of France is Paris. The capital of Italy is Rome.")
    r = requests.post(master.url + "/v1/completions", timeout=120, json={
        "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()                          # (T, vocab)
    slices = [s.vocab for s in make_plan(load_model_config(smollm2_dir), [1, 1]).shards]
    for t in range(1, len(ids)):
        row = logits[t - 1]
        tops = [torch.topk(row[a:b], 128) for a, b in slices]                           # per device
        cand = {int(i) + a: float(v) for (a, _), top in zip(slices, tops) for v, i in zip(top.values, top.indices)}
        norm = torch.logsumexp(torch.tensor(list(cand.values())), 0)
        logit = cand.get(ids[t], max(float(top.values[-1]) for top in tops))
        expected = float(logit - norm)
        assert math.isclose(lp["token_logprobs"][t], expected, abs_tol=2e-3), (t, lp["token_logprobs"][t], expected)
        exact = float(torch.log_softmax(row, -1)[ids[t]])
        assert lp["token_logprobs"][t] >= exact - 2e-3          # never below the true value
        best = max(cand, key=cand.get)
        assert math.isclose(lp["top_logprobs"][t][ChatTokenizer(smollm2_dir).decode([best])], cand[best] - float(norm),
                            abs_tol=2e-3)


def test_bad_feature_requests_name_the_field(master):
    def post(**body):
        return requests.post(master.url + "/v1/chat/completions", timeout=30,
                             json={"messages": [{"role": "user", "content": "Hi"}], **body})
    r = post(top_logprobs=3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = post(response_format={"type": "xml"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = post(tools=[{"type": "function", "function": {"name": "f"}}])
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_streamed_echo_sends_the_scored_prompt_first(client):
    chunks = [c for c in client.completions.create(model="smollm2", prompt="The capital of France is", echo=True,
                                                   logprobs=2, max_tokens=3, temperature=0, stream=True)
              if c.choices]
    first = chunks[0].choices[0]
    assert first.text == "The capital of France is"
    assert first.logprobs.token_logprobs[0] is None and len(first.logprobs.tokens) == 5
    assert all(lp <= 0 for lp in first.logprobs.token_logprobs[1:])
    generated = [t for c in chunks[1:] if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(generated) == "".join(c.choices[0].text for c in chunks[1:])
