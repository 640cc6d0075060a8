"""An `auto` reply's text (tools given, tool_choice "auto"), streamed as it is generated:
content until the model's output is recognised as a tool call, then the call itself: its name
as soon as the call's header (`{"name": "f", "arguments": ` in the format's spelling) is
complete, its arguments piece by piece as the model writes them (a JSON recognizer,
tpi.generation.json_state, finds where they end), further calls likewise.

Events, as ReplyShape yields them: ("text", content), ("call", (index, id, name)),
("arguments", (index, piece)).

Where a call starts: hermes at `<tool_call>`, mistral at `[TOOL_CALLS]` (then `[`), llama3
when the reply's first non-space character is `{`. The text from there on is held until the
header is complete. If it cannot become one (prose, or `"arguments"` before `"name"`), the
whole rest is held to the end and parsed whole (ToolFormat.parse), and what does not parse is
content, as before calls were streamed. Arguments go out as the model writes them: if the
model breaks their JSON, they end there (that call's `arguments` then do not parse).
"""
from __future__ import annotations

import json

from tpi.generation.json_state import JsonState
from tpi_master.tools import ToolFormat, openai_call

TEXT, HEADER, ARGS, AFTER, WHOLE, OVER = range(6)
NAME, KEY = object(), object()           # header parts: the function's name, the arguments' key
SPACE = " \t\r\n"
PARTIAL, FAIL = "partial", "fail"


def read_header(s: str, lead: str = ""):
    """`s` from where a call starts -> (name, index where its arguments begin), PARTIAL (it may
    still become a header) or FAIL."""
    i = 0
    for part in [*lead, "{", '"name"', ":", NAME, ",", KEY, ":", "{"]:
        while i < len(s) and s[i] in SPACE:
            i += 1
        if i == len(s):
            return PARTIAL
        if part is NAME:
            end = _string_end(s, i)
            if end in (PARTIAL, FAIL):
                return end
            name, i = json.loads(s[i:end]), end
            continue
        options = ['"arguments"', '"parameters"'] if part is KEY else [part]
        rest = s[i:]
        hit = next((o for o in options if rest.startswith(o)), None)
        if hit is None:
            return PARTIAL if any(o.startswith(rest) for o in options) else FAIL
        i += len(hit)
    return (name, i - 1) if isinstance(name, str) else FAIL   # the arguments start at their "{"


def _string_end(s: str, i: int):
    if s[i] != '"':
        return FAIL
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
            continue
        if s[j] == '"':
            return j + 1
        j += 1
    return PARTIAL


class ToolStream:
    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""                 # everything generated
        self.shown = 0                 # characters of it released as content
        self.pos = 0                   # HEADER/ARGS/AFTER: where reading resumes
        self.state = TEXT
        self.calls = 0                 # calls started
        self.args: JsonState | None = None

    def push(self, piece: str) -> list[tuple[str, object]]:
        self.text += piece
        events: list[tuple[str, object]] = []
        before = None
        while before != (self.state, self.pos):      # until a step makes no progress
            before = (self.state, self.pos)
            events += self._step()
        return events

    def _step(self) -> list[tuple[str, object]]:
        if self.state == TEXT:
            return self._text()
        if self.state == HEADER:
            lead = "[" if self.fmt.name == "mistral" and self.calls == 0 else ""
            got = read_header(self.text[self.pos:], lead)
            if got == PARTIAL:
                return []
            if got == FAIL:
                self.state = WHOLE if self.calls == 0 else OVER
                return []
            name, start = got
            self.pos += start
            self.state, self.args, self.calls = ARGS, JsonState(), self.calls + 1
            return [("call", (self.calls - 1, openai_call(name, "")["id"], name))]
        if self.state == ARGS:
            return self._arguments()
        if self.state == AFTER:
            return self._after()
        return []

    def _text(self) -> list[tuple[str, object]]:
        held = self.text[self.shown:]
        if self.fmt.name == "llama3":
            if self.text.strip() == "":
                return []              # may still start with "{"
            if self.text.lstrip().startswith("{"):
                self.state, self.pos = HEADER, self.shown
                return []
            at, keep = -1, 0
        else:
            marker = self.fmt.marker
            at = held.find(marker)
            keep = next((n for n in range(min(len(marker) - 1, len(held)), 0, -1) if held.endswith(marker[:n])), 0)
        out = held[:at] if at >= 0 else held[:len(held) - keep]
        if at >= 0:
            self.state, self.pos = HEADER, self.shown + at + len(self.fmt.marker)
        self.shown += len(out)
        return [("text", out)] if out else []

    def _arguments(self) -> list[tuple[str, object]]:
        start = self.pos
        while self.pos < len(self.text) and not self.args.done:
            if not self.args._char(self.text[self.pos]):
                self.state = OVER      # the model broke the arguments' JSON: they end here
                break
            self.pos += 1
        if self.args.done:
            self.state = AFTER
        piece = self.text[start:self.pos]
        return [("arguments", (self.calls - 1, piece))] if piece else []

    def _after(self) -> list[tuple[str, object]]:
        """Between calls: the format's closing, then the next call or nothing."""
        rest = self.text[self.pos:]
        nxt = {"hermes": self.fmt.marker, "mistral": ",", "llama3": ";"}[self.fmt.name]
        at = rest.find(nxt)
        if at >= 0:
            self.state, self.pos = HEADER, self.pos + at + len(nxt)
        return []

    def finish(self) -> list[tuple[str, object]]:
        """Generation ended: the content still held, or the calls of a reply parsed whole."""
        if self.state in (TEXT, WHOLE) or (self.state == HEADER and self.calls == 0):
            rest = self.text[self.shown:]
            _, calls = self.fmt.parse(self.text) if self.state != TEXT else ("", [])
            if not calls:
                return [("text", rest)] if rest else []
            self.calls = len(calls)
            return [e for i, c in enumerate(calls) for e in (("call", (i, c["id"], c["function"]["name"])),
                                                             ("arguments", (i, c["function"]["arguments"])))]
        return []
