"""Tool-call formats follow the model's own chat template: the real Qwen2.5 and Qwen3 templates
and our Llama-3.1-style and Mistral-style ones (tests/data/templates) render a past call, and
the format detected from the same template parses that rendered call back; a forced call's text
parses the same way. An auto reply's calls stream as they are written (tool_stream.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpi.tokenizer import _compile
from tpi_master.tool_stream import ToolStream
from tpi_master.tools import FORMATS, template_format

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
    ("mistral-style-tools.jinja", "mistral", "[/INST]"),
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


def events(fmt_name: str, text: str, size: int = 3) -> list:
    """The events of an auto reply fed `size` characters at a time, consecutive pieces of one
    kind joined, with the moment (characters fed) each first arrived."""
    stream, raw, out = ToolStream(FORMATS[fmt_name]), [], []
    for at in range(0, len(text), size):
        raw += [(k, v, min(at + size, len(text))) for k, v in stream.push(text[at:at + size])]
    raw += [(k, v, len(text)) for k, v in stream.finish()]
    for kind, value, at in raw:
        if out and out[-1][0] == kind and kind in ("text", "arguments"):
            joined = out[-1][1] + value if kind == "text" else (value[0], out[-1][1][1] + value[1])
            out[-1] = (kind, joined, out[-1][2])
        else:
            out.append((kind, value, at))
    return out


@pytest.mark.parametrize("fmt, text", [
    ("hermes", 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
               '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'),
    ("llama3", ' {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": '
               '{"zone": "CET"}}'),
    ("mistral", 'Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]'),
])
def test_auto_calls_stream_as_they_are_written(fmt, text):
    """The name goes out once the call's header is complete, the arguments while they are
    written, well before the reply ends."""
    got = events(fmt, text)
    kinds = [k for k, _, _ in got]
    assert kinds == (["text"] if fmt != "llama3" else []) + ["call", "arguments"] * 2
    if fmt != "llama3":
        assert got[0][1] == "Let me check. "
    calls = [(v[2], json.loads(a[1][1])) for (_, v, _), a in zip(got[-4::2], got[-3::2])]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    first_call, first_args_end = got[-4][2], text.index("Paris") + 10
    assert first_call <= text.index("{\"city") + 3 and first_call < first_args_end < len(text)
    assert got[-3][2] <= text.index("Paris") + 3, "the arguments start streaming as they are written"


def test_what_is_not_a_call_stays_content():
    assert [(k, v) for k, v, _ in events("hermes", "a <tool_call> b")] == [("text", "a <tool_call> b")]
    assert "".join(v for _, v, _ in events("hermes", "a <tool", 1)) == "a <tool"
    plain = events("llama3", "Hello {there}")
    assert [k for k, _, _ in plain] == ["text"] and plain[0][1] == "Hello {there}"
    broken = events("hermes", "<tool_call>{not json")
    assert [(k, v) for k, v, _ in broken] == [("text", "<tool_call>{not json")]
    swapped = '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>'
    parsed_whole = events("hermes", swapped)           # held to the end, then parsed whole
    assert [k for k, _, _ in parsed_whole] == ["call", "arguments"] and parsed_whole[0][2] == len(swapped)
