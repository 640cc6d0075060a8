"""A JSON schema enforced at every depth on top of the JSON recognizer (json_state.py).

Enforced (docs/api.md, "JSON mode", says the same):
* `type`: object, array, string, number, integer (no fraction or exponent), boolean, null, or
  a list of them;
* an object with `properties` has exactly its `required` properties (all its `properties`
  when `required` is absent), each once, in the schema's order: once the model opens a key,
  the key and its colon are forced character by character. An object without `properties`
  takes any keys and values;
* an array's `items` (one schema for every element), `minItems` and `maxItems`;
* `enum` and `const` of strings, numbers, booleans and null: the value is written exactly as
  `json.dumps` writes one of them;
* `$ref` to the schema's own `#/$defs/...` or `#/definitions/...` (pydantic's nested models);
* `anyOf` / `oneOf`: the branch is the one the value's first character allows (`n` null,
  `{` an object, ...); when several allow it, that value is not checked further.
Not enforced: string `pattern`, `format` and lengths, number ranges and `multipleOf`, `allOf`,
`not`, `if`/`then`, `uniqueItems`, `prefixItems`, `patternProperties`, remote `$ref`. Optional
properties are never written and no key outside `properties` is, so `additionalProperties`
holds whatever its value.

Same interface as JsonState (feed, accepts, completion, done, copy), so JsonConstraint takes
either.
"""
from __future__ import annotations

import json
import math

from tpi.generation.json_state import (AFTER, ARR_VALUE_OR_END, N_COMPLETE, NUMBER, OBJ_KEY, OBJ_KEY_OR_END,
                                       SPACE, VALUE, JsonState)

FIRST = {"string": '"', "number": "-0123456789", "integer": "-0123456789", "boolean": "tf", "null": "n",
         "object": "{", "array": "["}
DEFAULT = {"string": '"', "number": "0", "integer": "0", "boolean": "f", "null": "n", "object": "{", "array": "["}
MAX_COMPLETION = 20000     # characters: a schema whose shortest instance is longer is refused


class Frame:
    """One open container and its schema."""
    __slots__ = ("obj", "keys", "props", "next", "current", "items", "count", "min", "max")

    def __init__(self, obj: bool, schema: dict | None, resolve):
        s = schema or {}
        props = s.get("properties") if obj else None
        self.obj = obj
        self.props = props if isinstance(props, dict) and props else None   # None: any keys
        required = s.get("required")
        self.keys = ([k for k in self.props if k in required] if isinstance(required, list) else list(self.props)
                     ) if self.props else None
        self.next = 0                  # object: keys written so far
        self.current = None            # object: the schema of the value being written
        self.items = resolve(s.get("items")) if not obj else None
        self.count = 0                 # array: elements started
        self.min = _int(s.get("minItems"), 0) if not obj else 0
        self.max = _int(s.get("maxItems"), None) if not obj else None

    def copy(self) -> "Frame":
        c = Frame.__new__(Frame)
        for k in Frame.__slots__:
            setattr(c, k, getattr(self, k))
        return c

    def keys_left(self) -> bool:
        return self.keys is not None and self.next < len(self.keys)

    def may_close(self) -> bool:
        return not self.keys_left() if self.obj else self.count >= self.min

    def may_continue(self) -> bool:
        """May a comma follow the value just written?"""
        if self.obj:
            return self.keys is None or self.keys_left()
        return self.max is None or self.count < self.max


def _int(v, default):
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def enum_options(schema: dict) -> list[str] | None:
    """The JSON texts an `enum`/`const` allows, or None when it is absent or not all scalars."""
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if not isinstance(values, list) or not values:
        return None
    if not all(v is None or isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v))
               for v in values):
        return None
    return [json.dumps(v, ensure_ascii=False) for v in values]


def types_of(schema: dict) -> list[str] | None:
    t = schema.get("type")
    names = [t] if isinstance(t, str) else t if isinstance(t, list) else []
    names = [n for n in names if n in FIRST]
    return names or None


class SchemaState:
    __slots__ = ("inner", "root", "frames", "literal", "enum", "typed", "integer")

    def __init__(self, schema: dict):
        self.inner = JsonState()
        self.root = schema
        self.frames: list[Frame] = []   # parallel to inner.stack
        self.literal = ""               # forced text still to come (the rest of a key and its colon)
        self.enum: list[str] | None = None   # the options of the enum value being written
        self.typed = ""                 # what has been written of that value
        self.integer = False            # the number being written must be an integer

    def copy(self) -> "SchemaState":
        c = SchemaState.__new__(SchemaState)
        c.inner, c.root, c.frames = self.inner.copy(), self.root, [f.copy() for f in self.frames]
        c.literal, c.enum, c.typed, c.integer = self.literal, self.enum, self.typed, self.integer
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

    # ---- schemas ----

    def resolve(self, schema) -> dict | None:
        """`$ref`s followed; None: any value."""
        for _ in range(32):
            if not isinstance(schema, dict) or "$ref" not in schema:
                break
            ref = schema["$ref"]
            node = self.root
            if not isinstance(ref, str) or not ref.startswith("#"):
                return None
            for part in (p for p in ref[1:].split("/") if p):
                node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
            schema = node
        return schema if isinstance(schema, dict) and schema else None

    def first_chars(self, schema) -> str | None:
        """The characters a value of `schema` may start with (None: any)."""
        s = self.resolve(schema)
        if s is None:
            return None
        branches = s.get("anyOf") or s.get("oneOf")
        if isinstance(branches, list) and branches:
            firsts = [self.first_chars(b) for b in branches]
            return None if None in firsts else "".join(firsts)
        options = enum_options(s)
        if options:
            return "".join(o[0] for o in options)
        types = types_of(s)
        return "".join(FIRST[t] for t in types) if types else None

    def branch(self, schema, ch: str):
        """The schema a value starting with `ch` follows: a dict, None (any) or False (refused)."""
        s = self.resolve(schema)
        if s is None:
            return None
        branches = s.get("anyOf") or s.get("oneOf")
        if isinstance(branches, list) and branches:
            fits = [b for b in branches if (f := self.first_chars(b)) is None or ch in f]
            if not fits:
                return False
            return self.branch(fits[0], ch) if len(fits) == 1 else None
        first = self.first_chars(s)
        return s if first is None or ch in first else False

    def default_first(self, schema) -> str:
        """The first character of the shortest value of `schema`."""
        s = self.resolve(schema)
        if s is None:
            return "0"
        branches = s.get("anyOf") or s.get("oneOf")
        if isinstance(branches, list) and branches:
            return self.default_first(branches[0])
        options = enum_options(s)
        if options:
            return options[0][0]
        types = types_of(s)
        return DEFAULT[types[0]] if types else "0"

    def value_schema(self):
        if not self.inner.started:
            return self.root
        f = self.frames[-1]
        return f.current if f.obj else f.items

    # ---- one character ----

    def _char(self, ch: str) -> bool:
        if self.literal:
            if ch != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            return self.inner._char(ch)
        ended = False                     # an enum's number option is complete: no more digits
        if self.enum is not None:
            taken = self._enum_char(ch)
            if taken is not None:
                return taken
            ended = True
        inner = self.inner
        mode = inner.mode
        if mode == NUMBER:
            if not ended and ch in "0123456789+-.eE":
                return not (ch in ".eE" and self.integer) and inner._char(ch)
            if inner.aux not in N_COMPLETE:
                return False
            mode = AFTER                  # the number ended: ch belongs to what follows
        if ch in SPACE or mode not in (VALUE, ARR_VALUE_OR_END, OBJ_KEY_OR_END, OBJ_KEY, AFTER):
            return inner._char(ch)        # inside a string or literal, a colon, whitespace
        f = self.frames[-1] if self.frames else None
        if mode == ARR_VALUE_OR_END and ch == "]" or mode == AFTER and ch in "}]" or mode == OBJ_KEY_OR_END and ch == "}":
            if f is None or not f.may_close() or not inner._char(ch):
                return False
            self.frames.pop()
            return True
        if mode == AFTER:
            return ch == "," and f.may_continue() and inner._char(ch)
        if mode in (OBJ_KEY_OR_END, OBJ_KEY):
            if ch == '"' and f.keys is not None:
                if not f.keys_left():
                    return False
                key = f.keys[f.next]
                self.literal = json.dumps(key, ensure_ascii=False)[1:] + ":"
                f.current, f.next = f.props[key], f.next + 1
            elif ch == '"':
                f.current = None          # a free object's value: any
            return inner._char(ch)
        return self._start_value(ch, f)

    def _start_value(self, ch: str, f: Frame | None) -> bool:
        if f is not None and not f.obj:
            if f.max is not None and f.count >= f.max:
                return False
            f.count += 1
        s = self.branch(self.value_schema(), ch)
        if s is False:
            return False
        options = enum_options(s) if s else None
        if options:
            self.enum, self.typed = options, ""
            return bool(self._enum_char(ch))
        if not self.inner._char(ch):
            return False
        if ch in "{[":
            self.frames.append(Frame(ch == "{", s, self.resolve))
        types = types_of(s) if s else None
        self.integer = types is not None and "integer" in types and "number" not in types
        return True

    def _enum_char(self, ch: str) -> bool | None:
        """A character of an enum value: True/False, or None when a number option just ended."""
        typed = self.typed + ch
        if any(o.startswith(typed) for o in self.enum):
            if not self.inner._char(ch):
                return False
            self.typed = typed
            if self.inner.mode in (VALUE, AFTER, ARR_VALUE_OR_END, OBJ_KEY_OR_END, OBJ_KEY) or self.inner.done:
                self.enum = None          # a string or literal closed itself
            return True
        if self.inner.mode == NUMBER and self.typed in self.enum:
            self.enum, self.integer = None, False
            return None
        return False

    # ---- the shortest completion ----

    def completion(self) -> str:
        s, out = self.copy(), []
        while not s.done:
            ch = s._closing_char()
            if len(out) >= MAX_COMPLETION or not s._char(ch):
                raise ValueError(f"JSON schema: no instance completes {''.join(out)[:80]!r}")
            out.append(ch)
        return "".join(out)

    def _closing_char(self) -> str:
        if self.literal:
            return self.literal[0]
        if self.enum is not None:
            for o in self.enum:
                if o.startswith(self.typed) and len(o) > len(self.typed):
                    return o[len(self.typed)]
        inner = self.inner
        mode = inner.mode
        if mode == NUMBER and inner.aux in N_COMPLETE:
            mode = AFTER
        f = self.frames[-1] if self.frames else None
        if mode == AFTER:
            return "," if not f.may_close() else "}" if f.obj else "]"
        if mode in (OBJ_KEY_OR_END, OBJ_KEY) and f.keys is not None:
            return '"' if f.keys_left() else "}"
        if mode == ARR_VALUE_OR_END:
            return "]" if f.may_close() else self.default_first(f.items)
        if mode == VALUE:
            return self.default_first(self.value_schema()) if inner.started else "{"
        return inner._closing_char()
