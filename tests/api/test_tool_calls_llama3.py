"""Tool calls in the Llama 3.1 format end to end: a real master serving a random-weight Llama 3
model with our own Llama-3.1-style template (tests/data/templates/llama3-style-tools.jinja,
written for these tests), through the official `openai` client.

* tool_choice "auto": a random model never chooses to call by itself, so the reply is held to
  the call's shape by JSON mode (a json_schema whose object is `{"name": "get_weather",
  "parameters": {"city": ...}}`); the auto parser must recognise it as a call while it is
  being written and stream `tool_calls` deltas: the name before the arguments are finished,
  the arguments in pieces."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from procs import start_templated_master

TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "templates" / "llama3-style-tools.jinja"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_SHAPE = {"type": "json_schema", "json_schema": {"name": "call", "schema": {
    "type": "object", "required": ["name", "parameters"], "properties": {
        "name": {"const": "get_weather"}, "parameters": TOOLS[0]["function"]["parameters"]}}}}


@pytest.fixture(scope="module")
def llama(tiny_model, tmp_path_factory):
    server = start_templated_master(tiny_model("llama3"), TEMPLATE, tmp_path_factory.mktemp("llama-master"))
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c, c.models.list().data[0].id
    server.stop()


def deltas(chunks) -> list[tuple[int, object]]:
    """(chunk number, tool-call delta) for every tool-call delta of a stream."""
    return [(n, d) for n, c in enumerate(chunks) if c.choices for d in (c.choices[0].delta.tool_calls or [])]


def test_an_auto_call_streams_while_it_is_written(llama):
    client, name = llama
    chunks = list(client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, max_tokens=60,
                                                 temperature=0.8, seed=3, stream=True, response_format=CALL_SHAPE))
    got = deltas(chunks)
    (first_n, first), rest = got[0], got[1:]
    assert first.function.name == "get_weather" and first.id.startswith("call_") and first.index == 0
    arg_chunks = [n for n, d in rest if d.function.arguments]
    assert len(arg_chunks) >= 3, "the arguments arrive in pieces, as the model writes them"
    assert first_n < arg_chunks[0] < arg_chunks[-1] < len(chunks) - 1
    assert not any(c.choices[0].delta.content for c in chunks if c.choices), "a call is not content"
    args = json.loads("".join(d.function.arguments for _, d in rest))
    assert list(args) == ["city", "days"] and isinstance(args["city"], str)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    whole = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, max_tokens=60,
                                           temperature=0.8, seed=3, response_format=CALL_SHAPE)
    (call,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].message.content is None and json.loads(call.function.arguments) == args
