"""A character-level recognizer of one JSON object: which characters may come next, whether
the object is complete, and the shortest text that completes it.

Used by JSON mode (json_constraint.py) to mask the logits of tokens whose text would leave
valid JSON. Pure Python, no I/O; `copy()` is cheap (a small list and a few fields), so a
token is tested by feeding its characters to a copy.

The root must be an object (OpenAI's `json_object` contract). Runs of whitespace outside
strings are capped at MAX_SPACE characters, so a model cannot stall in whitespace forever.
"""
from __future__ import annotations

MAX_SPACE = 16
SPACE = " \t\n\r"
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
ESCAPES = '"\\/bfnrt'

# modes: what the next character may be
VALUE, OBJ_KEY_OR_END, OBJ_KEY, COLON, ARR_VALUE_OR_END, AFTER, STRING, ESCAPE, UNICODE, NUMBER, LITERAL, DONE = range(12)
# number sub-states: what has been read of the number so far
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
N_COMPLETE = {N_ZERO, N_INT, N_FRAC, N_EXP}


class JsonState:
    __slots__ = ("stack", "mode", "key", "aux", "spaces", "started")

    def __init__(self):
        self.stack: list[str] = []      # open containers, "{" or "["
        self.mode = VALUE
        self.key = False                # the string being read is an object key
        self.aux: object = None         # LITERAL: the rest of the word; UNICODE: hex digits left; NUMBER: sub-state
        self.spaces = 0                 # consecutive whitespace outside strings
        self.started = False            # the root object has been opened

    def copy(self) -> "JsonState":
        c = JsonState.__new__(JsonState)
        c.stack, c.mode, c.key, c.aux, c.spaces, c.started = list(self.stack), self.mode, self.key, self.aux, self.spaces, self.started
        return c

    @property
    def done(self) -> bool:
        return self.mode == DONE

    def feed(self, text: str) -> bool:
        """Advance over `text`; False (and the state is then undefined) if it leaves valid JSON."""
        for ch in text:
            if not self._char(ch):
                return False
        return True

    def accepts(self, text: str) -> bool:
        """Would `text` keep the JSON valid? (self is unchanged)"""
        return bool(text) and self.copy().feed(text)

    # ---- one character ----

    def _char(self, ch: str) -> bool:
        m = self.mode
        if m == STRING:
            if ch == '"':
                self.mode = COLON if self.key else self._after_value()
            elif ch == "\\":
                self.mode = ESCAPE
            elif ord(ch) < 0x20:
                return False
            return True
        if m == ESCAPE:
            if ch == "u":
                self.mode, self.aux = UNICODE, 4
            elif ch in ESCAPES:
                self.mode = STRING
            else:
                return False
            return True
        if m == UNICODE:
            if ch not in HEX:
                return False
            self.aux -= 1
            if self.aux == 0:
                self.mode = STRING
            return True
        if m == LITERAL:
            if ch != self.aux[0]:
                return False
            self.aux = self.aux[1:]
            if not self.aux:
                self.mode = self._after_value()
            return True
        if m == NUMBER:
            if self._number(ch):
                return True
            if self.aux not in N_COMPLETE:
                return False
            self.mode = self._after_value()   # the number ended: this char belongs to what follows
            return self._char(ch)
        if ch in SPACE:
            if m == DONE or self.spaces >= MAX_SPACE or not self.started:
                return False
            self.spaces += 1
            return True
        self.spaces = 0
        if m == DONE:
            return False
        if m in (OBJ_KEY_OR_END, OBJ_KEY):
            if ch == '"':
                self.mode, self.key = STRING, True
                return True
            if ch == "}" and m == OBJ_KEY_OR_END:
                return self._close("{")
            return False
        if m == COLON:
            if ch == ":":
                self.mode = VALUE
                return True
            return False
        if m == AFTER:
            top = self.stack[-1]
            if ch == ",":
                self.mode = OBJ_KEY if top == "{" else VALUE
                return True
            if ch in "}]":
                return self._close(ch == "}" and "{" or "[")
            return False
        if m == ARR_VALUE_OR_END and ch == "]":
            return self._close("[")
        return self._value(ch)      # VALUE or ARR_VALUE_OR_END

    def _value(self, ch: str) -> bool:
        if not self.started:        # the root: an object only
            if ch != "{":
                return False
            self.started = True
        if ch == "{":
            self.stack.append("{")
            self.mode = OBJ_KEY_OR_END
        elif ch == "[":
            self.stack.append("[")
            self.mode = ARR_VALUE_OR_END
        elif ch == '"':
            self.mode, self.key = STRING, False
        elif ch == "-" or ch in DIGITS:
            self.mode, self.aux = NUMBER, N_MINUS if ch == "-" else N_ZERO if ch == "0" else N_INT
        elif ch in "tfn":
            self.mode, self.aux = LITERAL, {"t": "rue", "f": "alse", "n": "ull"}[ch]
        else:
            return False
        return True

    def _number(self, ch: str) -> bool:
        s = self.aux
        if ch in DIGITS:
            nxt = {N_MINUS: N_ZERO if ch == "0" else N_INT, N_INT: N_INT, N_DOT: N_FRAC, N_FRAC: N_FRAC,
                   N_E: N_EXP, N_ESIGN: N_EXP, N_EXP: N_EXP}.get(s)
        elif ch == ".":
            nxt = N_DOT if s in (N_ZERO, N_INT) else None
        elif ch in "eE":
            nxt = N_E if s in (N_ZERO, N_INT, N_FRAC) else None
        elif ch in "+-":
            nxt = N_ESIGN if s == N_E else None
        else:
            nxt = None
        if nxt is None:
            return False
        self.aux = nxt
        return True

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self.mode = self._after_value()
        return True

    def _after_value(self) -> int:
        return AFTER if self.stack else DONE

    # ---- the shortest completion ----

    def completion(self) -> str:
        """The shortest text that makes the object complete ("" when done)."""
        s, out = self.copy(), []
        while not s.done:
            ch = s._closing_char()
            s._char(ch)
            out.append(ch)
        return "".join(out)

    def _closing_char(self) -> str:
        m = self.mode
        if m == STRING:
            return '"'
        if m == ESCAPE:
            return "n"
        if m == UNICODE:
            return "0"
        if m == LITERAL:
            return self.aux[0]
        if m == NUMBER:
            return "0" if self.aux not in N_COMPLETE else ("}" if self.stack[-1] == "{" else "]")
        if m in (OBJ_KEY_OR_END, AFTER, ARR_VALUE_OR_END):
            return "}" if self.stack and self.stack[-1] == "{" else "]" if self.stack else "{"
        if m == OBJ_KEY:
            return '"'
        if m == COLON:
            return ":"
        return "{" if not self.started else "0"      # VALUE
