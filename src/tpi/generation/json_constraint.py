"""JSON mode: a per-sequence logits processor that lets only tokens keeping the output valid
JSON be chosen, so the text always parses (tpi.generation.json_state is the recognizer).

The generator calls `mask(logits, remaining)` before choosing each token and `advance(token)`
after; when the object is complete the sequence ends (`done`), without waiting for an
end-of-sequence token.

Candidates, not the full vocabulary. The master never sees a full row of logits: the output
head returns each device's top K, scattered into a row of -inf (tpi.model.head). So the mask
is computed over the finite candidates only (N x K tokens, each tested by feeding its text to
a copy of the recognizer; ~N*K*4 characters a step), and:

* if some candidates are valid, the sequence chooses among them with its own sampling
  parameters (greedy, temperature, top-k/top-p all see the masked row);
* if none is (a random model, or a model that wants to write prose), the row falls back to
  ONE token: the longest token whose text is a prefix of the shortest completion of the
  JSON so far (`JsonState.completion`), with logit 0. That closes the innermost open string /
  container; the model gets its say again at the next step;
* when the tokens left (`remaining`) are no more than the completion's length, only prefixes
  of the completion are allowed (candidates first, then the fallback), so the object is
  closed within the budget: the output parses whenever max_tokens leaves room for the
  shortest completion (1 token for "{}" once the object is open);
* a token can lengthen the completion (a `,` in an array of objects adds a whole element), so
  from `reserve` characters before that point on, only the NEAR_END best candidates are
  considered, each allowed only if the completion after it still fits in the tokens left
  (each one's completion computed: ~5 ms a step for an 80-character completion, hence only
  near the budget). `reserve` is the schema's shortest instance (at most MAX_RESERVE) + 16
  characters, more than one token adds in practice.

Token texts come from `ChatTokenizer.token_texts()` (each token decoded after an anchor token,
so a leading space is kept); special tokens and tokens that are part of a multi-byte character
have no text and are never allowed: JSON mode writes non-ASCII text only through tokens that
hold whole characters.
"""
from __future__ import annotations

import weakref

import torch

from tpi.generation.json_schema import SchemaState
from tpi.generation.json_state import JsonState

_INDEXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
NEAR_END = 32          # candidates checked one by one near the token budget
MAX_RESERVE = 256      # characters


def vocab_index(tokenizer, vocab_size: int) -> "VocabIndex":
    """The tokenizer's VocabIndex over the model's vocabulary (padded ids have no text), built once."""
    if tokenizer not in _INDEXES:
        texts = tokenizer.token_texts()[:vocab_size]
        _INDEXES[tokenizer] = VocabIndex(texts + [""] * (vocab_size - len(texts)))
    return _INDEXES[tokenizer]


class VocabIndex:
    """The vocabulary's token texts, and the tokens by first character (for the fallback)."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.by_first: dict[str, list[tuple[str, int]]] = {}
        for i, t in enumerate(texts):
            if t:
                self.by_first.setdefault(t[0], []).append((t, i))
        for lst in self.by_first.values():
            lst.sort(key=lambda p: -len(p[0]))

    def longest_prefix_of(self, text: str) -> int:
        for t, i in self.by_first.get(text[0], ()):
            if text.startswith(t):
                return i
        raise ValueError(f"JSON mode: the vocabulary has no token starting {text[:1]!r}")


class JsonConstraint:
    def __init__(self, vocab: VocabIndex, schema: dict | None = None):
        """schema: an object JSON schema, enforced too (json_schema.SchemaState says which
        keywords); None: any JSON object."""
        self.vocab = vocab
        self.state = SchemaState(schema) if schema else JsonState()
        self.text = ""                 # what has been chosen so far
        self.reserve = min(len(self.state.completion()), MAX_RESERVE) + 16

    @property
    def done(self) -> bool:
        return self.state.done

    def mask(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """logits (vocab,) float32, -inf outside the candidates -> the same with every token
        that would break the JSON (or not close it in `remaining` tokens) at -inf."""
        completion = self.state.completion()
        closing = remaining <= len(completion)
        texts = self.vocab.texts
        candidates = torch.nonzero(torch.isfinite(logits)).flatten().tolist()
        if closing:
            allowed = [i for i in candidates if texts[i] and completion.startswith(texts[i])]
        elif remaining <= len(completion) + self.reserve:
            best = sorted(candidates, key=lambda i: -logits[i].item())[:NEAR_END]
            allowed = [i for i in best if self._fits(texts[i], remaining)]
        else:
            allowed = [i for i in candidates if self.state.accepts(texts[i])]
        out = torch.full_like(logits, float("-inf"))                                   # (vocab,)
        if allowed:
            idx = torch.tensor(allowed)
            out[idx] = logits[idx]
        else:
            out[self.vocab.longest_prefix_of(completion)] = 0.0
        return out

    def _fits(self, text: str, remaining: int) -> bool:
        """Does `text` continue the JSON and leave a completion shorter than `remaining`?"""
        s = self.state.copy()
        return bool(text) and s.feed(text) and len(s.completion()) < remaining

    def advance(self, token: int) -> None:
        text = self.vocab.texts[token]
        if not self.state.feed(text):   # mask() only allows tokens that feed
            raise ValueError(f"JSON mode: token {token} ({text!r}) does not continue {self.text!r}")
        self.text += text
