"""Token ids in, text pieces out, as tokens arrive.

Decoding a token alone can split a multi-byte character, so each step decodes a short
window of recent tokens and emits only the text that has become stable (the method of
text-generation-inference's `decode_token`). Stop strings are matched on the text: the
tail that could still grow into a stop string is held back until it cannot.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0    # ids[prefix_offset:read_offset] were decoded already
        self.read_offset = 0
        self.pending = ""         # decoded text not yet emitted (may hold a partial stop string)
        self.text = ""            # everything emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text that can be emitted now ("" if none)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.pending += full[len(prefix):]
        return self._release()

    def finish(self) -> str:
        """Generation ended: emit what was held back."""
        if self.stopped:
            return ""
        out, self.pending = self.pending, ""
        self.text += out
        return out

    def _release(self) -> str:
        if not self.stop:
            out, self.pending = self.pending, ""
            self.text += out
            return out
        # search the emitted tail too: a stop string may straddle what was emitted and what is new
        tail = max(len(s) for s in self.stop) - 1
        window = self.text[-tail:] if tail else ""
        hay = window + self.pending
        hits = [i for i in (hay.find(s) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits) - len(window)
            out = self.pending[:max(cut, 0)]
            self.pending, self.stopped = "", True
            self.text += out
            return out
        hold = self._partial_stop_len(hay)
        keep = min(hold, len(self.pending))
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        self.text += out
        return out

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
