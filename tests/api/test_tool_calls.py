"""Tool calls end to end: a real master serving a random-weight Qwen2 model with Qwen2.5's own
chat template (tests/data/templates), the official `openai` client declaring a function and
naming it in tool_choice. A random model would never choose to call, so the call is forced and
its arguments decoded in JSON mode; what is tested is the format end to end: the template
renders the tools and past calls, the reply parses back into a call, streamed or not."""
from __future__ import annotations

import json
from pathlib import Path

import ollama
import openai
import pytest

from procs import start_templated_master

TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
FORCE = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen_master(tiny_model, tmp_path_factory):
    server = start_templated_master(tiny_model("qwen2"), TEMPLATE, tmp_path_factory.mktemp("qwen-master"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def qwen(qwen_master):
    c = openai.OpenAI(base_url=qwen_master.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return c, c.models.list().data[0].id


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=5)])
def test_a_forced_call_arrives_as_a_tool_call(qwen, sampling):
    client, name = qwen
    r = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice=FORCE,
                                       max_tokens=30, **sampling)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)            # the declared parameters, typed
    assert list(args) == ["city"] and isinstance(args["city"], str)


def test_streamed_tool_call_deltas(qwen):
    client, name = qwen
    chunks = list(client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice=FORCE,
                                                 max_tokens=30, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id and deltas[0].index == 0
    assert len(deltas) > 2, "the name first, then the arguments piece by piece"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    full = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice=FORCE,
                                          max_tokens=30, temperature=0)
    assert arguments == full.choices[0].message.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_the_tool_result_goes_back_into_the_conversation(qwen):
    """The call and its result, rendered by the template, make a longer prompt; with
    tool_choice "none" the model answers in text."""
    client, name = qwen
    first = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice=FORCE,
                                           max_tokens=30, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model=name, messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=5, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is not None
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_ollama_chat_takes_tools_and_tool_results(qwen_master, qwen):
    _, name = qwen
    client = ollama.Client(host=qwen_master.url, timeout=120)
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
                         {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "tool_name": "get_weather", "content": '{"temperature": 21}'}]
    r = client.chat(model=name, messages=history, tools=TOOLS, options={"num_predict": 4, "temperature": 0})
    assert r.done and r.prompt_eval_count > 60
    j = client.chat(model=name, messages=ASK, format="json", options={"num_predict": 20, "temperature": 0.9})
    assert isinstance(json.loads(j.message.content), dict)
