"""Ollama response shapes from a scheduled completion: one JSON object, or NDJSON lines (one
per piece of text, then a final line with `done: true` and the counts and durations).

Reads the same `Completion.pieces()` as the OpenAI responses (responses.py), so stop
strings, cancellation on a closed connection and tool-call parsing are shared."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Iterator

from tpi_master.responses import ClientGone, Completion


def parameter_count(cfg) -> int:
    """Weights of a Llama-family model from its config (embedding, layers, final norm, head)."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = H * cfg.num_heads * hd * 2 + H * cfg.num_kv_heads * hd * 2   # q, o; k, v
    layer = attn + 3 * H * I + 2 * H
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * H
    return cfg.vocab_size * H + cfg.num_layers * layer + H + head


def model_details(store) -> dict:
    n = parameter_count(store.config)
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    return {"parent_model": "", "format": "safetensors", "family": store.config.family,
            "families": [store.config.family], "parameter_size": size, "quantization_level": store.dtype.upper()}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class OllamaReply:
    """kind: "chat" (/api/chat: `message`) or "generate" (/api/generate: `response`)."""

    def __init__(self, kind: str, completion: Completion, model: str, t0: float):
        self.kind, self.completion, self.model, self.t0 = kind, completion, model, t0
        self.first: float | None = None

    def _line(self, text: str, tool_calls: list | None = None) -> dict:
        out = {"model": self.model, "created_at": now_iso()}
        if self.kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
            if tool_calls:
                out["message"]["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                              "arguments": _arguments(c["function"]["arguments"])}}
                                                for c in tool_calls]
        else:
            out["response"] = text
        out["done"] = False
        return out

    def _final(self, reason: str, text: str = "", tool_calls: list | None = None) -> dict:
        end = time.monotonic()
        first = self.first or end
        out = self._line(text, tool_calls)
        out.update({"done": True, "done_reason": "stop" if reason == "tool_calls" else reason,
                    "total_duration": int((end - self.t0) * 1e9), "load_duration": 0,
                    "prompt_eval_count": len(self.completion.spec.prompt_ids),
                    "prompt_eval_duration": int((first - self.t0) * 1e9),
                    "eval_count": self.completion.completion_tokens,
                    "eval_duration": int((end - first) * 1e9)})
        return out

    def _events(self) -> Iterator[tuple[str, object]]:
        """The completion's pieces, with tool calls gathered into one ("tool_calls", [calls])
        before the end (Ollama sends a call whole)."""
        calls: list[dict] = []
        pieces = self.completion.pieces()
        try:
            for kind, value in pieces:
                if kind in ("text", "call") and self.first is None:
                    self.first = time.monotonic()
                if kind == "call":
                    calls.append({"function": {"name": value[2], "arguments": ""}})
                elif kind == "arguments":
                    calls[value[0]]["function"]["arguments"] += value[1]
                else:
                    if kind == "end" and calls:
                        yield "tool_calls", calls
                    yield kind, value
        finally:
            pieces.close()

    def body(self) -> tuple[int, dict]:
        text, calls, reason = [], [], "stop"
        events = self._events()
        try:
            for kind, value in events:
                if kind == "text":
                    text.append(value)
                elif kind == "tool_calls":
                    calls.extend(value)
                elif kind == "end":
                    reason = value
                elif kind == "error":
                    return value.status, {"error": value.message}
        except ClientGone:
            return 499, {"error": "client closed the request"}
        finally:
            events.close()
        return 200, self._final(reason, "".join(text), calls)

    def ndjson(self) -> Iterator[str]:
        """Closing this generator (the server does when a write fails) cancels the generation."""
        events = self._events()
        try:
            for kind, value in events:
                if kind == "text":
                    yield _dump(self._line(value))
                elif kind == "tool_calls":
                    yield _dump(self._line("", value))
                elif kind == "end":
                    yield _dump(self._final(value))
                elif kind == "error":
                    yield _dump({"error": value.message})
        except ClientGone:
            return
        finally:
            events.close()


def _arguments(text: str) -> dict | str:
    """A call's arguments as Ollama sends them (an object); the text itself if the model broke
    their JSON mid-call (tool_stream.py)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"
