"""Tool calling in the model's own format: which format the chat template teaches, the text
that opens and closes a call, and the calls parsed back out of generated text.

| format | chat templates                         | one call as the model writes it                      |
|--------|----------------------------------------|------------------------------------------------------|
| hermes | Qwen2.5, Qwen3, Hermes (`<tool_call>`) | `<tool_call>\n{"name": N, "arguments": {...}}\n</tool_call>` |
| llama3 | Llama 3.1 / 3.2 / 3.3 (JSON, `"parameters"`) | `{"name": N, "parameters": {...}}`             |
| mistral| Mistral / Mixtral (`[TOOL_CALLS]`)     | `[TOOL_CALLS] [{"name": N, "arguments": {...}}]`     |

A forced call (`tool_choice` naming a function) appends `opening(name)` to the prompt, decodes
the arguments in JSON mode, and closes the call with `closing`: the text is then exactly what
`parse` reads, the same format the template renders for past calls in the conversation.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolFormat:
    name: str
    marker: str                     # text that starts a call in free generation
    args_key: str                   # "arguments" or "parameters"
    open_tmpl: str                  # text before the arguments of one call to {name}
    closing: str                    # text after them

    def opening(self, fn: str) -> str:
        return self.open_tmpl.replace("{name}", json.dumps(fn)[1:-1])

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """Generated text -> (content before the calls, OpenAI tool calls). No call: (text, [])."""
        at = text.find(self.marker)
        if at < 0 or (self.name == "llama3" and text[:at].strip()):
            return text, []
        content, body = text[:at], text[at:]
        if self.name == "hermes":
            blobs = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", body + ("" if body.rstrip().endswith(
                "</tool_call>") else "</tool_call>"), re.S)
        elif self.name == "mistral":
            blobs = [body[len(self.marker):].strip()]
        else:
            blobs = [b for b in body.split(";")]
        calls = []
        for blob in blobs:
            try:
                value = json.loads(blob)
            except ValueError:
                return text, []
            for item in value if isinstance(value, list) else [value]:
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    return text, []
                args = item.get(self.args_key, item.get("arguments", {}))
                calls.append(openai_call(item["name"], json.dumps(args, ensure_ascii=False)))
        return content.strip(), calls


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "arguments",
                         '<tool_call>\n{"name": "{name}", "arguments": ', "}\n</tool_call>"),
    "llama3": ToolFormat("llama3", "{", "parameters", '{"name": "{name}", "parameters": ', "}"),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "arguments",
                          '[TOOL_CALLS] [{"name": "{name}", "arguments": ', "}]"),
}


def template_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches, or None if it renders no tools."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in t:
        return FORMATS["mistral"]
    if '"parameters": ' in t and ("ipython" in t or "<|python_tag|>" in t):
        return FORMATS["llama3"]
    return None


def openai_call(name: str, arguments: str) -> dict:
    return {"id": "call_" + secrets.token_hex(8), "type": "function",
            "function": {"name": name, "arguments": arguments}}
