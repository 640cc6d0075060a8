"""The optional parts of a request beyond plain text: tools and tool_choice, tool calls and
results in the conversation, response_format (JSON mode), log probabilities. Each parser
checks its field and names it in the error (an `APIError`, 400)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from tpi.generation.json_schema import SchemaState
from tpi_master.errors import bad_request, unsupported, wrong_type
from tpi_master.tools import ToolFormat, template_format

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Features:
    tools: list | None = None             # OpenAI function definitions, rendered by the template
    tool_format: ToolFormat | None = None  # set when the reply is parsed for tool calls
    forced_tool: str | None = None        # tool_choice names this function: the reply IS its call
    json_mode: bool = False               # the reply (or the forced call's arguments) is a JSON object
    schema: dict | None = None            # ... following this JSON schema (json_schema.py: what is enforced)
    logprobs: int | None = None           # alternatives per generated token (0: the chosen one only)
    score_prompt: bool = False            # /v1/completions echo + logprobs: the prompt's tokens too


def parse_tools(body: dict, chat_template: str | None) -> tuple[list | None, ToolFormat | None, str | None]:
    """tools + tool_choice -> (tools to render, the format to parse calls in, the forced function)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return None, None, None
    if not isinstance(tools, list):
        raise wrong_type("tools", "an array of tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                              f"tools[{i}]")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict)):
            raise wrong_type(f"tools[{i}].function.parameters", "a JSON schema object (with 'properties' an object)")
        if params is not None:
            check_writable(params, f"tools[{i}].function.parameters")
        names.append(fn["name"])
    fmt = template_format(chat_template)
    if fmt is None:
        raise unsupported("tools", "tool calling with this model's chat template (it renders no tools)")
    if choice in (None, "auto"):
        return tools, fmt, None
    if choice == "none":
        return tools, None, None
    if choice == "required":
        if len(names) != 1:
            raise unsupported("tool_choice", "'required' with more than one tool (name the function)")
        return tools, fmt, names[0]
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise bad_request("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in names:
        raise bad_request(f"'tool_choice' names '{name}', which is not among 'tools'", "tool_choice")
    return tools, fmt, name


def tool_parameters(tools: list, name: str) -> dict | None:
    """The JSON schema of function `name`'s parameters (None if it declares none)."""
    for t in tools:
        if t["function"]["name"] == name:
            params = t["function"].get("parameters")
            return params if isinstance(params, dict) and params.get("type", "object") == "object" else None
    return None


def parse_response_format(body: dict) -> tuple[bool, dict | None]:
    """(JSON mode: json_object, or json_schema with an object schema; that schema)."""
    fmt = body.get("response_format")
    if fmt is None:
        return False, None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("'response_format.type' must be \"text\", \"json_object\" or \"json_schema\"",
                          "response_format")
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise wrong_type("response_format.json_schema.schema", "a JSON schema object")
        if schema.get("type", "object") != "object":
            raise unsupported("response_format", "a JSON schema whose root is not an object")
        if not isinstance(schema.get("properties", {}), dict):
            raise wrong_type("response_format.json_schema.schema.properties", "an object")
        check_writable(schema, "response_format.json_schema.schema")
        return True, schema
    return fmt["type"] != "text", None


def check_writable(schema: dict, param: str) -> None:
    """Refuses a schema JSON mode cannot finish (no finite instance, e.g. an object that
    requires itself): decoding would otherwise fail mid-reply."""
    try:
        SchemaState(schema).completion()
    except ValueError as e:
        raise bad_request(f"'{param}': {e}", param) from None


def parse_chat_logprobs(body: dict) -> int | None:
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise wrong_type("logprobs", "a boolean")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_request(f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
        if not lp:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if lp else None


def parse_completion_logprobs(body: dict) -> int | None:
    lp = body.get("logprobs")
    if lp is None or lp is False:
        return None
    if not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= MAX_TOP_LOGPROBS:
        raise bad_request(f"'logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    return lp


def tool_message(msg: dict, where: str) -> dict:
    """A tool result, or an assistant message with tool calls, in the shape chat templates
    read (Hugging Face's: arguments as an object)."""
    out = {"role": msg["role"], "content": msg.get("content") or ""}
    if not isinstance(out["content"], str):
        raise wrong_type(f"{where}.content", "a string")
    if msg["role"] == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(msg.get(key), str):
                out[key] = msg[key]
        return out
    calls = msg.get("tool_calls")
    if not isinstance(calls, list):
        raise wrong_type(f"{where}.tool_calls", "an array of tool calls")
    out["tool_calls"] = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"'{where}.tool_calls[{j}]' must have function.name", f"{where}.tool_calls")
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise bad_request(f"'{where}.tool_calls[{j}].function.arguments' is not valid JSON",
                              f"{where}.tool_calls") from None
        out["tool_calls"].append({"id": call.get("id"), "type": "function",
                                  "function": {"name": fn["name"], "arguments": args}})
    return out
