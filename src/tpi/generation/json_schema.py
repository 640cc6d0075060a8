"""A JSON schema's top level, enforced on top of the JSON recognizer: the object's keys are
the schema's (its `required` properties, else all its `properties`), each once, in the
schema's order, and each value starts as its `type` says (a string `"`, a number or integer a
digit or `-`, an integer no fraction or exponent, a boolean `true`/`false`, `null`, an object
`{`, an array `[`). Values nested deeper, and `enum`/`pattern`/length limits, are not checked:
the output is valid JSON with the schema's keys and top-level types.

Same interface as JsonState (feed, accepts, completion, done, copy), so JsonConstraint takes
either: a key is written by the model's first `"` and then forced character by character.
"""
from __future__ import annotations

import json

from tpi.generation.json_state import (AFTER, COLON, N_COMPLETE, NUMBER, OBJ_KEY, OBJ_KEY_OR_END, SPACE, VALUE,
                                       JsonState)

FIRST = {"string": '"', "number": "-0123456789", "integer": "-0123456789", "boolean": "tf", "null": "n",
         "object": "{", "array": "["}
DEFAULT = {"string": '"', "number": "0", "integer": "0", "boolean": "f", "null": "n", "object": "{", "array": "["}


def schema_keys(schema: dict) -> tuple[list[str], dict[str, str | None]]:
    """The keys to write, in order, and each one's JSON type (None: any)."""
    props = schema.get("properties") or {}
    required = schema.get("required")
    keys = [k for k in props if k in required] if isinstance(required, list) else list(props)
    types = {}
    for k in keys:
        t = props[k].get("type") if isinstance(props[k], dict) else None
        types[k] = t if t in FIRST else None
    return keys, types


class SchemaState:
    __slots__ = ("inner", "keys", "types", "next", "literal", "current")

    def __init__(self, schema: dict):
        self.inner = JsonState()
        self.keys, self.types = schema_keys(schema)
        self.next = 0                   # keys written so far
        self.literal = ""               # forced text still to come (the rest of a key and its colon)
        self.current: str | None = None  # the type of the top-level value being written

    def copy(self) -> "SchemaState":
        c = SchemaState.__new__(SchemaState)
        c.inner, c.keys, c.types = self.inner.copy(), self.keys, self.types
        c.next, c.literal, c.current = self.next, self.literal, self.current
        return c

    @property
    def done(self) -> bool:
        return self.inner.done

    def accepts(self, text: str) -> bool:
        return bool(text) and self.copy().feed(text)

    def feed(self, text: str) -> bool:
        for ch in text:
            if not self._char(ch):
                return False
        return True

    def _top(self) -> bool:
        return self.inner.stack == ["{"]

    def _char(self, ch: str) -> bool:
        if self.literal:
            if ch != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            return self.inner._char(ch)
        mode, left = self.inner.mode, self.next < len(self.keys)
        if self._top() and ch not in SPACE:
            if mode in (OBJ_KEY_OR_END, OBJ_KEY):
                if ch == '"':
                    if not left:
                        return False
                    key = self.keys[self.next]
                    self.literal = json.dumps(key, ensure_ascii=False)[1:] + ":"
                    self.current, self.next = self.types[key], self.next + 1
                elif ch == "}" and left:
                    return False
            elif mode == AFTER or (mode == NUMBER and ch in ",}"):
                if (ch == "," and not left) or (ch == "}" and left):
                    return False
            elif mode == VALUE and self.current is not None and ch not in FIRST[self.current]:
                return False
            elif mode == NUMBER and self.current == "integer" and ch in ".eE":
                return False
        return self.inner._char(ch)

    def completion(self) -> str:
        s, out = self.copy(), []
        while not s.done:
            ch = s._closing_char()
            if not s._char(ch):
                raise AssertionError(f"schema completion stuck at {''.join(out)!r}")
            out.append(ch)
        return "".join(out)

    def _closing_char(self) -> str:
        if self.literal:
            return self.literal[0]
        inner, left = self.inner, self.next < len(self.keys)
        if inner.started and self._top():
            mode = inner.mode
            if mode in (OBJ_KEY_OR_END, OBJ_KEY):
                return '"' if left else "}"
            if mode == AFTER or (mode == NUMBER and inner.aux in N_COMPLETE):
                return "," if left else "}"
            if mode == VALUE:
                return DEFAULT.get(self.current, "0")
            if mode == COLON:
                return ":"
        return inner._closing_char()
