"""Prefill and batched decode on the master: embed, run the cluster, choose, stop, repeat.

The master holds neither the embedding table nor the output head: it reads the embedding
rows of its tokens on demand (tpi.weights.embedding) and chooses from the candidates the
devices' vocabulary slices return (tpi.model.head).

Both the HTTP server's scheduler (services/master/scheduler.py: a batch of the sequences
holding KV-cache slots) and `tpi generate` (a batch of one) drive this one loop:
`prefill(seq)` once, then `decode(seqs)` until every sequence is done. Each call is ONE
cluster forward and returns a `Step`; the caller decides what runs next (queueing,
cancellation and recovery stay with it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from tpi.config import ModelConfig
from tpi.generation.logprobs import prompt_logprobs
from tpi.generation.sequence import Advance, Sequence, Step
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
    step_times_s: list[float] = field(default_factory=list)   # wall time of each decode step
    breakdowns: list[Breakdown] = field(default_factory=list)  # per device, summed over decode


@dataclass
class TokenEvent:
    token: int
    elapsed_s: float                # since the request started


class Generator:
    def __init__(self, cfg: ModelConfig, embedder, cluster, tokenizer, max_seq: int,
                 stop_ids: set[int] = frozenset()):
        # embedder: .embed(ids (B, T)) -> (B, T, H), e.g. tpi.weights.embedding.EmbeddingRows
        # cluster: a tpi.cluster.Cluster (its forward returns the output head's candidates)
        self.cfg, self.embedder, self.cluster, self.tokenizer = cfg, embedder, cluster, tokenizer
        self.max_seq = max_seq
        self.stop_ids = set(stop_ids)

    # ---- sequences ----

    def check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len >= self.max_seq:
            raise ContextOverflowError(
                f"prompt has {prompt_len} tokens; the context holds {self.max_seq}")

    def sequence(self, prompt: list[int], params: SamplingParams, slot: int = 0,
                 ignore_eos: bool = False, processor=None, score_prompt: int | None = None) -> Sequence:
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
                        score_prompt=score_prompt)

    # ---- one forward each ----

    def prefill(self, seq: Sequence) -> Step:
        """Run the prompt (and the tokens already chosen, after a recovery) from position 0
        of the sequence's slot, and choose its next token."""
        ids = seq.prompt + seq.tokens
        scored = seq if seq.score_prompt is not None and seq.prompt_logprobs is None else None
        logits, wall, breakdowns = self._forward(torch.tensor([ids]), [seq.slot], [0], scored)  # (1, 1, vocab)
        seq.pos = len(ids)
        return Step([self._accept(seq, logits[0])], wall, True, breakdowns)

    def decode(self, seqs: list[Sequence]) -> Step:
        """One forward over every sequence (B rows, each in its own slot at its own position),
        feeding each its last token; each chooses its next one."""
        for seq in seqs:
            if seq.done or seq.pos == 0:
                raise ValueError("decode takes prefilled sequences that are not done")
        ids = torch.tensor([[s.tokens[-1]] for s in seqs])                             # (B, 1)
        logits, wall, breakdowns = self._forward(ids, [s.slot for s in seqs], [s.pos for s in seqs])
        advances = []
        for b, seq in enumerate(seqs):
            seq.pos += 1                       # its last token is in the cache now
            advances.append(self._accept(seq, logits[b]))
        return Step(advances, wall, False, breakdowns)

    def _forward(self, ids: torch.Tensor, slots: list[int], starts: list[int], scored: Sequence | None = None):
        """ids (B, T) -> logits (B, 1, vocab) float32 of each row's last position, the wall
        time and each device's time split. With `scored` (B = 1) the cluster returns every
        position's candidates and its prompt's tokens are scored from them."""
        t0 = time.perf_counter()
        x = self.embedder.embed(ids)
        if scored is None:
            candidates = self.cluster.forward(x, slots, starts)
        else:
            candidates = self.cluster.forward(x, slots, starts, every_position=True)     # T rows
            scored.prompt_logprobs = prompt_logprobs(candidates.values, candidates.ids, self.cluster.world_size,
                                                     scored.prompt, scored.score_prompt)
            candidates = Candidates(candidates.values[-1:], candidates.ids[-1:], candidates.vocab_size)
        logits = candidates.logits()[:, None]                                          # (B, 1, vocab)
        return logits, time.perf_counter() - t0, self.cluster.breakdowns()

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> Advance:
        """logits (n, vocab) of the positions this step scored -> the tokens the sequence
        keeps, with the stop rules and the budget applied."""
        proc = seq.processor
        try:
            row = logits[0] if proc is None else proc.mask(logits[0], seq.budget - len(seq.tokens))
            chosen = [choose_token(row, seq.params, seq.rng)]
            if proc is not None:
                proc.advance(chosen[0])
        except Exception as e:  # e.g. probabilities that are not finite: only this sequence fails
            seq.finish_reason = "error"
            return Advance(seq, [], logits[:0], "error", f"sampling failed: {e}")
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
        return Advance(seq, kept, logits[:len(chosen)], seq.finish_reason)

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
            step_times_s=step_times,
            breakdowns=totals,
        )
