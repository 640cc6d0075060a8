"""Tool calls in the Llama 3.1 and Mistral formats end to end: a real master serving a
random-weight Llama 3 / Mistral model with our own template in that style
(tests/data/templates/llama3-style-tools.jinja, mistral-style-tools.jinja, written for these
tests), through the official `openai` client.

* tool_choice naming the function: the reply IS its call (`{"name": ..., "parameters": ...}`,
  `[TOOL_CALLS] [{"name": ..., "arguments": ...}]`), streamed or not, and the call and its
  result render back into the conversation.
* tool_choice "auto" (Llama 3.1 style): a random model never chooses to call by itself, so the
  reply is held to the call's shape by JSON mode (a json_schema whose object is
  `{"name": "get_weather", "parameters": {...}}`); the auto parser must recognise it as a call
  while it is being written and stream `tool_calls` deltas: the name before the arguments are
  finished, the arguments in pieces."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from procs import start_templated_master

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "templates"
FAMILIES = {"llama3": "llama3-style-tools.jinja", "mistral": "mistral-style-tools.jinja"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}]
FORCE = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_SHAPE = {"type": "json_schema", "json_schema": {"name": "call", "schema": {
    "type": "object", "required": ["name", "parameters"], "properties": {
        "name": {"const": "get_weather"}, "parameters": TOOLS[0]["function"]["parameters"]}}}}


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """served(family) -> (openai client, model name) of a master with our template of that style."""
    servers, clients = [], {}

    def get(family: str):
        if family not in clients:
            servers.append(start_templated_master(tiny_model(family), TEMPLATES / FAMILIES[family],
                                                  tmp_path_factory.mktemp(f"{family}-master")))
            c = openai.OpenAI(base_url=servers[-1].url + "/v1", api_key="unused", max_retries=0, timeout=120)
            clients[family] = c, c.models.list().data[0].id
        return clients[family]

    yield get
    for s in servers:
        s.stop()


def deltas(chunks) -> list[tuple[int, object]]:
    """(chunk number, tool-call delta) for every tool-call delta of a stream."""
    return [(n, d) for n, c in enumerate(chunks) if c.choices for d in (c.choices[0].delta.tool_calls or [])]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=5)])
def test_a_forced_call(served, family, sampling):
    client, name = served(family)
    r = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice=FORCE,
                                       max_tokens=40, **sampling)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert list(args) == ["city", "days"] and isinstance(args["city"], str) and type(args["days"]) is int
    streamed = list(client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice=FORCE,
                                                   max_tokens=40, stream=True, **sampling))
    got = [d for _, d in deltas(streamed)]
    assert got[0].function.name == "get_weather" and len(got) > 2
    if not sampling.get("seed"):
        assert "".join(d.function.arguments or "" for d in got) == call.function.arguments
    # the call and its result rendered back by the template: a longer prompt, a text answer
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    again = client.chat.completions.create(model=name, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=4, temperature=0)
    assert again.choices[0].message.tool_calls is None and again.usage.prompt_tokens > r.usage.prompt_tokens + 15


def test_an_auto_call_streams_while_it_is_written(served):
    client, name = served("llama3")
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
