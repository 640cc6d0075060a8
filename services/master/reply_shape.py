"""What a reply's text becomes, by the request's features: plain content; the arguments of a
forced tool call (tool_choice named a function: the generated text IS the arguments JSON);
or content that may turn into tool calls (tools given, tool_choice auto: tool_stream.ToolStream).

Events, as Completion.pieces() yields them: ("text", content), ("call", (index, id, name)),
("arguments", (index, json_text)), ("end", reason). A reply that made calls ends with
reason "tool_calls"."""
from __future__ import annotations

from typing import Iterator

from tpi_master.features import Features
from tpi_master.tool_stream import ToolStream
from tpi_master.tools import openai_call


class ReplyShape:
    def __init__(self, features: Features):
        self.features = features
        self.forced = features.forced_tool
        self.auto = ToolStream(features.tool_format) if features.tool_format and not self.forced else None
        self.calls = 0

    def start(self) -> Iterator[tuple[str, object]]:
        if self.forced:
            self.calls = 1
            yield "call", (0, openai_call(self.forced, "")["id"], self.forced)

    def text(self, piece: str) -> Iterator[tuple[str, object]]:
        if not piece:
            return
        if self.forced:
            yield "arguments", (0, piece)
        elif self.auto is not None:
            yield from self.auto.push(piece)
        else:
            yield "text", piece

    def end(self, reason: str) -> Iterator[tuple[str, object]]:
        if self.auto is not None:
            yield from self.auto.finish()
            self.calls = self.auto.calls
        yield "end", "tool_calls" if self.calls and reason == "stop" else reason
