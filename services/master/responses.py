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

    # ---- the shared event loop ----

    def pieces(self) -> Iterator[tuple[str, object]]:
        """Yields ("text", str), ("wait", None) while nothing happens, then ("end", reason) or
        ("error", APIError)."""
        seq, stream = self.seq, TextStream(self.tokenizer, self.spec.stop)
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
                    text = stream.push(ev.token)
                    if text:
                        yield "text", text
                    if stream.stopped:
                        seq.cancel("stop")
                        yield "end", "stop"
                        return
                elif isinstance(ev, Finished):
                    text = stream.finish()
                    if text:
                        yield "text", text
                    yield "end", ev.reason
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
        text, reason = [self.spec.echo], "stop"
        pieces = self.pieces()
        try:
            for kind, value in pieces:
                if kind == "text":
                    text.append(value)
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
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "logprobs": None, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return 200, {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                     "choices": [choice], "usage": self.usage(), "system_fingerprint": None}

    # ---- streaming ----

    def _chunk(self, delta: str | None, reason: str | None = None, first: bool = False) -> str:
        if self.kind == "chat":
            d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
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
            yield self._chunk(None, first=True)
        elif self.spec.echo:
            yield self._chunk(self.spec.echo)
        else:
            yield ": started\n\n"  # sends the headers now, even for a queued completion
        position, quiet_since = None, time.monotonic()
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
                if kind == "text":
                    yield self._chunk(value)
                elif kind == "end":
                    yield self._chunk(None, reason=value)
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
