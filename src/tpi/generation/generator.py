"""Prefill and batched decode on the master: embed, run the cluster, choose, stop, repeat.

The master holds neither the embedding table nor the output head: it reads the embedding
rows of its tokens on demand (tpi.weights.embedding) and chooses from the candidates the
devices' vocabulary slices return (tpi.model.head).

Both the HTTP server's scheduler (services/master/scheduler.py: a batch of the sequences
holding KV-cache slots) and `tpi generate` (a batch of one) drive this one loop:
`prefill(seq)` once, then `decode(seqs)` until every sequence is done. Each call is ONE
cluster forward and returns a `Step`; the caller decides what runs next (queueing,
cancellation and recovery stay with it).

With a drafter (tpi.generation.draft), a decode step is speculative: each row feeds its
last token and up to K draft tokens, the cluster scores all K + 1 positions in the same
forward (one pair of collectives per layer, whatever K), and `verify`
(tpi.generation.speculative) keeps the accepted drafts plus one token of the target's own.
Rows of one batch may keep different counts.

KV-cache rollback: every device writes a row's keys and values at their positions and
reads only positions below the current step's (`KVCache.write`/`read`, the causal mask), so
a rejected draft's entries are dead once the sequence's `pos` is set back to the accepted
length: the next step overwrites them before anything reads them. The rollback is that one
assignment in `decode`; no message goes to the devices.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from tpi.config import ModelConfig
from tpi.generation.draft import Draft
from tpi.generation.logprobs import prompt_logprobs
from tpi.generation.sequence import Advance, Sequence, Step
from tpi.generation.speculative import verify
from tpi.model.head import Candidates
from tpi.model.sampling import SamplingParams, choose_token
from tpi.timing import Breakdown


class ContextOverflowError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the context."""


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float
    token_latency_s: float          # mean over decoded tokens (excludes the first token)
    finish_reason: str              # "stop" | "length" | "error"
    decode_steps: int = 0           # cluster forwards after the prefill
    drafted: int = 0                # draft tokens the cluster verified
    accepted: int = 0               # of which it accepted
    step_times_s: list[float] = field(default_factory=list)   # wall time of each decode step
    breakdowns: list[Breakdown] = field(default_factory=list)  # per device, summed over decode


@dataclass
class TokenEvent:
    token: int
    elapsed_s: float                # since the request started


class Generator:
    def __init__(self, cfg: ModelConfig, embedder, cluster, tokenizer, max_seq: int,
                 stop_ids: set[int] = frozenset(), drafter=None, draft_tokens: int = 0):
        # embedder: .embed(ids (B, T)) -> (B, T, H), e.g. tpi.weights.embedding.EmbeddingRows
        # cluster: a tpi.cluster.Cluster (its forward returns the output head's candidates)
        # drafter: .propose(seqs, ks) -> a Draft per row (tpi.generation.draft), or None
        self.cfg, self.embedder, self.cluster, self.tokenizer = cfg, embedder, cluster, tokenizer
        self.max_seq = max_seq
        self.stop_ids = set(stop_ids)
        self.drafter, self.draft_tokens = drafter, draft_tokens

    # ---- sequences ----

    def check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len >= self.max_seq:
            raise ContextOverflowError(
                f"prompt has {prompt_len} tokens; the context holds {self.max_seq}")

    def sequence(self, prompt: list[int], params: SamplingParams, slot: int = 0,
                 ignore_eos: bool = False, processor=None, score_prompt: int | None = None,
                 speculative: bool = True) -> Sequence:
        """A new sequence in KV-cache `slot`. The token budget is the one rule for every
        caller: max_new_tokens, capped by the context left after the prompt. `processor`
        masks its logits before each choice; `score_prompt` (alternatives per token) has the
        prefill score the prompt's tokens too (seq.prompt_logprobs)."""
        self.check_fits(len(prompt))
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1; got {params.max_new_tokens}")
        stops = frozenset() if ignore_eos else frozenset(self.stop_ids | set(params.stop_token_ids))
        rng = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        budget = min(params.max_new_tokens, self.max_seq - len(prompt))
        return Sequence(list(prompt), params, stops, budget, rng, slot, processor=processor,
                        score_prompt=score_prompt, speculative=speculative)

    # ---- one forward each ----

    def prefill(self, seq: Sequence) -> Step:
        """Run the prompt (and the tokens already chosen, after a recovery) from position 0
        of the sequence's slot, and choose its next token."""
        ids = seq.prompt + seq.tokens
        scored = seq if seq.score_prompt is not None and seq.prompt_logprobs is None else None
        logits, wall, breakdowns = self._forward(torch.tensor([ids]), [seq.slot], [0], scored=scored)  # (1, 1, vocab)
        seq.pos = len(ids)
        return Step([self._accept(seq, logits[0], Draft([]))], wall, True, breakdowns)

    def decode(self, seqs: list[Sequence]) -> Step:
        """One forward over every sequence (B rows, each in its own slot at its own position),
        feeding each its last token and its draft tokens; each keeps its accepted drafts and
        one more token."""
        for seq in seqs:
            if seq.done or seq.pos == 0:
                raise ValueError("decode takes prefilled sequences that are not done")
        drafts = self._drafts(seqs)
        T = 1 + max(len(d.tokens) for d in drafts)                  # positions per row
        ids = torch.tensor([[s.tokens[-1], *d.tokens] + [d.tokens[-1] if d.tokens else s.tokens[-1]]
                            * (T - 1 - len(d.tokens)) for s, d in zip(seqs, drafts)])  # (B, T), padded
        logits, wall, breakdowns = self._forward(ids, [s.slot for s in seqs], [s.pos for s in seqs], T > 1)
        advances = []
        for b, (seq, draft) in enumerate(zip(seqs, drafts)):
            adv = self._accept(seq, logits[b, :1 + len(draft.tokens)], draft)
            # the rollback: positions past the last token fed and kept are dead (see above)
            seq.pos += 1 + adv.accepted
            advances.append(adv)
        return Step(advances, wall, False, breakdowns)

    def _drafts(self, seqs: list[Sequence]) -> list[Draft]:
        """Each row's draft: at most K tokens, none past its budget (the last token of the
        budget is the target's own) and all rows' positions within the context. A row whose
        choices are constrained (a processor: JSON mode) takes one token per step."""
        room = min(self.max_seq - s.pos for s in seqs) - 1            # padded rows need it too
        ks = [max(0, min(self.draft_tokens, s.budget - len(s.tokens) - 1, room))
              if s.speculative and s.processor is None else 0 for s in seqs]
        if self.drafter is None or not any(ks):
            return [Draft([]) for _ in seqs]
        return [d.clip(k) for d, k in zip(self.drafter.propose(seqs, ks), ks)]

    def _forward(self, ids: torch.Tensor, slots: list[int], starts: list[int], every: bool = False,
                 scored: Sequence | None = None):
        """ids (B, T) -> logits (B, T', vocab) float32 (T' = T with `every` position, else 1:
        the last), the wall time and each device's time split. With `scored` (a prefill, B = 1)
        the cluster returns every position's candidates and its prompt's tokens are scored."""
        t0 = time.perf_counter()
        B, T = ids.shape
        candidates = self.cluster.forward(self.embedder.embed(ids), slots, starts,
                                          every_position=every or scored is not None)
        if scored is not None:
            scored.prompt_logprobs = prompt_logprobs(candidates.values, candidates.ids, self.cluster.world_size,
                                                     scored.prompt, scored.score_prompt)
            candidates = Candidates(candidates.values[-1:], candidates.ids[-1:], candidates.vocab_size)
        logits = candidates.logits().view(B, T if every else 1, -1)                   # (B, T', vocab)
        return logits, time.perf_counter() - t0, self.cluster.breakdowns()

    def _accept(self, seq: Sequence, logits: torch.Tensor, draft: Draft) -> Advance:
        """logits (1 + len(draft), vocab) of the positions this step scored -> the tokens the
        sequence keeps, with the stop rules and the budget applied."""
        proc = seq.processor
        try:
            if proc is None:
                chosen = verify(logits, draft.tokens, seq.params, seq.rng, draft.probs)
            else:  # constrained: one token, chosen among those the processor allows
                chosen = [choose_token(proc.mask(logits[0], seq.budget - len(seq.tokens)), seq.params, seq.rng)]
                proc.advance(chosen[0])
        except Exception as e:  # e.g. probabilities that are not finite: only this sequence fails
            seq.finish_reason = "error"
            return Advance(seq, [], logits[:0], "error", f"sampling failed: {e}")
        accepted = len(chosen) - 1
        seq.drafted += len(draft.tokens)
        seq.accepted += accepted
        kept = []
        for token in chosen:
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
                break
            kept.append(token)
            seq.tokens.append(token)
            if proc is not None and proc.done:   # e.g. the JSON object is complete
                seq.finish_reason = "stop"
                break
            if len(seq.tokens) >= seq.budget:
                seq.finish_reason = "length"
                break
        return Advance(seq, kept, logits[:len(chosen)], seq.finish_reason,
                       drafted=len(draft.tokens), accepted=accepted)

    # ---- a batch of one: `tpi generate` ----

    def steps(self, seq: Sequence) -> Iterator[Step]:
        """Drive one sequence to its end, one step at a time."""
        step = self.prefill(seq)
        yield step
        while not seq.done:
            step = self.decode([seq])
            yield step

    def stream(self, prompt: list[int], params: SamplingParams, slot: int = 0) -> Iterator[TokenEvent]:
        """Yield generated tokens one by one (a stop token is not yielded)."""
        seq = self.sequence(prompt, params, slot)
        t0 = time.perf_counter()
        for step in self.steps(seq):
            for token in step.advances[0].tokens:
                yield TokenEvent(token, time.perf_counter() - t0)

    def generate(self, prompt: list[int], params: SamplingParams, slot: int = 0) -> GenerationResult:
        seq = self.sequence(prompt, params, slot)
        totals = [Breakdown() for _ in range(self.cluster.world_size)]
        t0 = time.perf_counter()
        token_times, step_times, decode_steps, error = [], [], 0, None
        for step in self.steps(seq):
            now = time.perf_counter() - t0
            token_times += [now] * len(step.advances[0].tokens)
            error = step.advances[0].error or error
            if not step.prefill:
                decode_steps += 1
                step_times.append(step.wall_s)
                for total, b in zip(totals, step.breakdowns):
                    total.add(b)
        if error:
            raise RuntimeError(error)
        decoded = len(token_times) - 1
        return GenerationResult(
            tokens=seq.tokens,
            text=self.tokenizer.decode(seq.tokens) if self.tokenizer else "",
            prompt_tokens=len(prompt),
            ttft_s=token_times[0] if token_times else 0.0,
            token_latency_s=(token_times[-1] - token_times[0]) / decoded if decoded > 0 else 0.0,
            finish_reason=seq.finish_reason or "stop",
            decode_steps=decode_steps,
            drafted=seq.drafted,
            accepted=seq.accepted,
            step_times_s=step_times,
            breakdowns=totals,
        )
