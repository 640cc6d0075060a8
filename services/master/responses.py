"""From a scheduled sequence's events to OpenAI response bodies: one JSON object, or a
stream of server-sent events ending in `data: [DONE]`.

Both paths read the same `pieces()`: text as it becomes stable, then the end. They watch
the client's connection while waiting, so a client that goes away cancels its generation
(even a non-streaming one, which writes nothing until the end).
"""
from __future__ import annotations

import json
import queue
import time
from typing import Callable, Iterator

from tpi_master.errors import APIError
from tpi_master.logprob_format import LogprobFormat
from tpi_master.reply_shape import ReplyShape
from tpi_master.scheduler import Failed, Finished, Request, Scheduler, Token
from tpi_master.textstream import TextStream
from tpi_master.validation import GenerationSpec

POLL_S = 0.2            # how often a waiting request thread looks at its client's socket
KEEPALIVE_S = 10.0      # an SSE comment after this much silence keeps proxies from timing out


class ClientGone(Exception):
    pass


class Completion:
    """One request's response. `kind` is "chat" (/v1/chat/completions) or "text" (/v1/completions)."""

    def __init__(self, kind: str, spec: GenerationSpec, seq: Request, scheduler: Scheduler,
                 tokenizer, model_name: str, client_closed: Callable[[], bool]):
        self.kind, self.spec, self.seq, self.scheduler = kind, spec, seq, scheduler
        self.tokenizer, self.model_name, self.client_closed = tokenizer, model_name, client_closed
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + seq.id
        self.created = int(time.time())
        self.completion_tokens = 0
        self.logprobs = LogprobFormat(tokenizer, spec.features, seq)

    # ---- the shared event loop ----

    def pieces(self) -> Iterator[tuple[str, object]]:
        """Yields ("text", str) as content becomes stable, ("logprobs", [TokenLogprob]) before
        the text of those tokens, ("call", (index, id, name)) and ("arguments", (index, str))
        for tool calls, ("wait", None) while nothing happens, then ("end", reason) or
        ("error", APIError)."""
        seq, stream = self.seq, TextStream(self.tokenizer, self.spec.stop)
        shape = ReplyShape(self.spec.features)
        yield from shape.start()
        last_check = time.monotonic()
        try:
            while True:
                try:
                    ev = seq.events.get(timeout=POLL_S)
                except queue.Empty:
                    ev = None
                if time.monotonic() - last_check >= POLL_S:
                    last_check = time.monotonic()
                    if self.client_closed():
                        raise ClientGone()
                if ev is None:
                    if not self.scheduler.alive:
                        yield "error", APIError(503, "the scheduler has stopped", type="server_error",
                                                code="scheduler_stopped")
                        return
                    yield "wait", None
                elif isinstance(ev, Token):
                    self.completion_tokens += 1
                    if ev.logprob is not None:
                        yield "logprobs", [ev.logprob]
                    yield from shape.text(stream.push(ev.token))
                    if stream.stopped:
                        seq.cancel("stop")
                        yield from shape.end("stop")
                        return
                elif isinstance(ev, Finished):
                    yield from shape.text(stream.finish())
                    yield from shape.end(ev.reason)
                    return
                elif isinstance(ev, Failed):
                    yield "error", ev.error
                    return
        finally:  # the client went away (or the consumer stopped early): free the slot
            if not seq.done:
                seq.cancel("cancelled")
                self.scheduler.wake()

    def usage(self) -> dict:
        p = len(self.spec.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                "total_tokens": p + self.completion_tokens}

    # ---- non-streaming ----

    def body(self) -> tuple[int, dict]:
        text, reason, calls, lps = [self.spec.echo], "stop", [], []
        pieces = self.pieces()
        try:
            for kind, value in pieces:
                if kind == "text":
                    text.append(value)
                elif kind == "logprobs":
                    lps += value
                elif kind == "call":
                    calls.append({"id": value[1], "type": "function", "function": {"name": value[2], "arguments": ""}})
                elif kind == "arguments":
                    calls[value[0]]["function"]["arguments"] += value[1]
                elif kind == "end":
                    reason = value
                elif kind == "error":
                    return value.status, value.body()
        except ClientGone:
            return 499, {"error": {"message": "client closed the request", "type": "client_closed",
                                   "param": None, "code": None}}
        finally:
            pieces.close()
        content = "".join(text)
        if self.kind == "chat":
            message = {"role": "assistant", "content": content or (None if calls else "")}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "logprobs": self.logprobs.chat(lps), "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "logprobs": self.logprobs.text(lps, self.spec.echo),
                      "finish_reason": reason}
            obj = "text_completion"
        return 200, {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                     "choices": [choice], "usage": self.usage(), "system_fingerprint": None}

    # ---- streaming ----

    def _chunk(self, delta: dict | str | None, reason: str | None = None, lps: list | None = None,
               echo: bool = False) -> str:
        if self.kind == "chat":
            d = {"content": delta} if isinstance(delta, str) else (delta or {})
            choice = {"index": 0, "delta": d, "logprobs": self.logprobs.chat(lps), "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": self.logprobs.text(lps, "echo" if echo else ""),
                      "finish_reason": reason}
            obj = "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                 "choices": [choice], "system_fingerprint": None}
        if self.spec.include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    def sse(self) -> Iterator[str]:
        """Server-sent events. Closing this generator (the server does when a write to the
        client fails) cancels the generation."""
        if self.kind == "chat":
            yield self._chunk({"role": "assistant", "content": ""})
        else:
            yield ": started\n\n"  # sends the headers now, even for a queued completion
        echo = self.kind == "text" and self.spec.echo   # sent once the prompt is scored (its first event)
        position, quiet_since, lps = None, time.monotonic(), None
        pieces = self.pieces()
        try:
            for kind, value in pieces:
                if kind == "wait":
                    now, pos = time.monotonic(), self.scheduler.position(self.seq)
                    if pos != position and pos > 0:
                        position = pos
                        yield f": queue position {pos}\n\n"
                    elif now - quiet_since >= KEEPALIVE_S:
                        quiet_since = now
                        yield ": keepalive\n\n"
                    continue
                quiet_since = time.monotonic()
                if echo:
                    yield self._chunk(echo, lps=[] if self.spec.features.logprobs is not None else None, echo=True)
                    echo = ""
                if kind == "logprobs":
                    lps = (lps or []) + value      # sent with the text of these tokens
                elif kind == "text":
                    yield self._chunk(value, lps=lps)
                    lps = None
                elif kind == "call":
                    yield self._chunk({"tool_calls": [{"index": value[0], "id": value[1], "type": "function",
                                                       "function": {"name": value[2], "arguments": ""}}]})
                elif kind == "arguments":
                    yield self._chunk({"tool_calls": [{"index": value[0], "function": {"arguments": value[1]}}]},
                                      lps=lps)
                    lps = None
                elif kind == "end":
                    yield self._chunk(None, reason=value, lps=lps)
                    if self.spec.include_usage:
                        yield _sse({"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat"
                                    else "text_completion", "created": self.created,
                                    "model": self.model_name, "choices": [], "usage": self.usage()})
                elif kind == "error":
                    yield _sse(value.body())
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            pieces.close()


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"
