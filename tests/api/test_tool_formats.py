"""Tool-call formats follow the model's own chat template: the real Qwen2.5, Qwen3 and
Llama-3.1-style templates (tests/data/templates) render a past call, and the format detected from
the same template parses that rendered call back; a forced call's text parses the same way."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpi.tokenizer import _compile
from tpi_master.tools import ToolStream, template_format

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "templates"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ARGS = {"city": "Paris", "days": 2}


def render(name: str, messages: list[dict]) -> str:
    return _compile((TEMPLATES / name).read_text()).render(messages=messages, tools=TOOLS,
                                                           add_generation_prompt=False, bos_token="", eos_token="")


@pytest.mark.parametrize("name, fmt, marker", [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes", "<|im_start|>assistant\n"),
    ("Qwen-Qwen3-0.6B.jinja", "hermes", "<|im_start|>assistant\n"),
    ("llama3-style-tools.jinja", "llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_the_rendered_call_parses_back(name, fmt, marker):
    f = template_format((TEMPLATES / name).read_text())
    assert f is not None and f.name == fmt
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]}]
    text = render(name, messages)
    assert "get_weather" in text.split(marker)[0], "the template lists the tools"
    turn = text.split(marker)[-1]
    turn = turn.split("<|im_end|>")[0].split("<|eot_id|>")[0].split("<|eom_id|>")[0]
    content, calls = f.parse(turn)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == ARGS
    # a forced call: opening + arguments + closing is the same format
    forced = f.opening("get_weather") + json.dumps(ARGS) + f.closing
    assert json.loads(f.parse(forced)[1][0]["function"]["arguments"]) == ARGS


def test_auto_replies_stream_content_and_hold_back_calls():
    f = template_format((TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text())
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    stream = ToolStream(f)
    shown = "".join(stream.push(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, calls = stream.finish()
    assert shown + rest == "Let me check. " and calls[0]["function"]["name"] == "get_weather"
    plain = ToolStream(f)
    shown = "".join(plain.push(p) for p in ["a <tool", "_ca", " nothing"]) + plain.finish()[0]
    assert shown == "a <tool_ca nothing"
    broken = ToolStream(f)
    shown = "".join(broken.push(p) for p in ["<tool_call>{not json"])
    assert shown + broken.finish()[0] == "<tool_call>{not json" and broken.finish()[1] == []
