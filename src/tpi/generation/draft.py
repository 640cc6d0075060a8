"""Drafters: cheap guesses of a sequence's next K tokens, for the cluster to verify in one
forward (tpi.generation.speculative).

* `PromptLookup` (prompt lookup decoding): the tokens that followed the latest earlier
  occurrence of the sequence's last n tokens (n = 3, then 2), in the prompt or the reply
  so far. No model, no memory: it wins where the reply copies its input (rewrite, edit,
  summarise with quotes, code changes).
* `DraftModel`: a small model with the same vocabulary, run on the master alone (its own
  in-process engine and KV cache, one slot per target slot); it proposes K tokens one
  forward each, greedy or sampled with the request's parameters (its probabilities go to
  the verifier).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tpi.generation.sequence import Sequence
from tpi.model.sampling import probabilities


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None   # (len(tokens), vocab): the drafter's distributions, if it sampled

    def clip(self, k: int) -> "Draft":
        return Draft(self.tokens[:k], None if self.probs is None else self.probs[:k])


class PromptLookup:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        return [Draft(self.lookup(s.prompt + s.tokens, k) if k > 0 else []) for s, k in zip(seqs, ks)]

    def lookup(self, context: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the context's last
        n tokens (the longest n that occurs)."""
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    return context[start + n:start + n + k]
        return []


class DraftModel:
    """A small model on the master; `engine` is an in-process tpi.engine.Engine of one device
    with at least as many KV-cache slots as the target."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name
        self.max_seq = engine.generator.max_seq
        self.fed: dict[int, list[int]] = {}      # per slot: the tokens its draft cache holds

    def close(self) -> None:
        self.engine.close()

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        # no draft where the draft model's own context would overflow
        ks = [k if len(s.prompt) + len(s.tokens) + k <= self.max_seq else 0 for s, k in zip(seqs, ks)]
        drafts = [Draft([]) for _ in seqs]
        rows = [b for b, k in enumerate(ks) if k > 0]
        if not rows:
            return drafts
        last = {}  # row -> logits (vocab,) of the next token after its context
        for b in rows:
            last[b] = self._catch_up(seqs[b])
        probs = {b: [] for b in rows}
        for i in range(max(ks[b] for b in rows)):
            live = [b for b in rows if len(drafts[b].tokens) < ks[b]]
            for b in live:
                p = probabilities(last[b], seqs[b].params) if not seqs[b].params.greedy else None
                token = int(last[b].argmax()) if p is None else int(torch.multinomial(p, 1, generator=seqs[b].rng))
                drafts[b].tokens.append(token)
                if p is not None:
                    probs[b].append(p)
            feed = [b for b in live if len(drafts[b].tokens) < ks[b]]
            if not feed:
                break
            logits = self._forward(seqs, feed, [[drafts[b].tokens[-1]] for b in feed])  # (B', vocab)
            for j, b in enumerate(feed):
                last[b] = logits[j]
        for b in rows:
            if probs[b]:
                drafts[b].probs = torch.stack(probs[b])                              # (k, vocab)
        return drafts

    def _catch_up(self, seq: Sequence) -> torch.Tensor:
        """Feed the draft cache what it lacks of the sequence's context; the logits (vocab,)
        of the next token."""
        context = seq.prompt + seq.tokens
        fed = self.fed.get(seq.slot, [])
        keep = 0
        while keep < min(len(fed), len(context) - 1) and fed[keep] == context[keep]:
            keep += 1
        self.fed[seq.slot] = context[:keep]
        return self._forward([seq], [0], [context[keep:]])[0]

    def _forward(self, seqs, rows: list[int], ids: list[list[int]]) -> torch.Tensor:
        """ids: per row the tokens to append to its draft cache (equal lengths) -> (B', vocab)."""
        eng = self.engine
        slots = [seqs[b].slot for b in rows]
        starts = [len(self.fed[s]) for s in slots]
        out = eng.cluster.forward(eng.embedder.embed(torch.tensor(ids)), slots, starts).logits()
        for s, t in zip(slots, ids):
            self.fed[s] = self.fed[s] + t
        return out


def attach_drafter(engine, settings, opts) -> None:
    """Make `engine`'s generator speculate as `settings` (tpi.settings.DraftSettings) say: the
    drafter "ngram" (prompt lookup), a draft model's source (loaded here, on the master alone,
    with the target's runtime `opts`, so one KV slot per target slot), or None / "none" for
    plain decoding."""
    gen, drafter, tokens = engine.generator, settings.drafter, settings.tokens
    if drafter in (None, "", "none") or tokens < 1:
        gen.drafter, gen.draft_tokens = None, 0
        return
    if drafter == "ngram":
        gen.drafter, gen.draft_tokens = PromptLookup(), tokens
        return
    from dataclasses import replace

    from tpi.engine import build_inproc_engine
    from tpi.settings import ModelSettings

    draft = build_inproc_engine(ModelSettings(drafter, (1.0,)),
                                replace(opts, max_seq=gen.max_seq))
    if draft.store.config.vocab_size != engine.store.config.vocab_size:
        draft.close()
        raise ValueError(f"the draft model {drafter} has a vocabulary of {draft.store.config.vocab_size} tokens; "
                         f"the model served has {engine.store.config.vocab_size}: a draft model must share it")
    gen.drafter, gen.draft_tokens = DraftModel(draft, drafter), tokens
