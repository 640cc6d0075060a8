"""Prefill and decode on the master: embed, run the cluster, sample, repeat.

The master holds neither the embedding table nor the output head: it reads the embedding
rows of its tokens on demand (tpi.weights.embedding) and samples from the candidates the
devices' vocabulary slices return (tpi.model.head)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from tpi.cluster.base import Cluster
from tpi.config import ModelConfig
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
    token_latency_s: float          # mean over decode steps (excludes the first token)
    finish_reason: str              # "stop" | "length" | "cancelled"
    step_times_s: list[float] = field(default_factory=list)
    breakdowns: list[Breakdown] = field(default_factory=list)  # per device, summed over decode


@dataclass
class TokenEvent:
    token: int
    elapsed_s: float                # since the request started


class Generator:
    def __init__(self, cfg: ModelConfig, embedder, cluster: Cluster, tokenizer, max_seq: int,
                 stop_ids: set[int] = frozenset()):
        # embedder: .embed(ids (B, T)) -> (B, T, H), e.g. tpi.weights.embedding.EmbeddingRows
        self.cfg, self.embedder, self.cluster, self.tokenizer = cfg, embedder, cluster, tokenizer
        self.max_seq = max_seq
        self.stop_ids = set(stop_ids)

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len >= self.max_seq:
            raise ContextOverflowError(
                f"prompt has {prompt_len} tokens; the context holds {self.max_seq}")

    def stream(self, prompt: list[int], params: SamplingParams, slot: int = 0,
               cancelled: Callable[[], bool] = lambda: False) -> Iterator[TokenEvent]:
        """Yield generated tokens one by one (the stop token is not yielded)."""
        self.check_fits(len(prompt), params.max_new_tokens)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stops = self.stop_ids | set(params.stop_token_ids)
        t0 = time.perf_counter()
        ids = torch.tensor([prompt])                               # (1, T)
        pos = 0
        budget = min(params.max_new_tokens, self.max_seq - len(prompt))
        for _ in range(budget):
            candidates = self.cluster.forward(self.embedder.embed(ids), [slot], [pos])  # 1 row
            pos += ids.shape[1]
            token = choose_token(candidates.logits()[0], params, gen)
            if token in stops:
                return
            yield TokenEvent(token, time.perf_counter() - t0)
            if cancelled():
                return
            ids = torch.tensor([[token]])                           # (1, 1)

    def generate(self, prompt: list[int], params: SamplingParams, slot: int = 0) -> GenerationResult:
        tokens, times = [], []
        totals = [Breakdown() for _ in range(self.cluster.world_size)]
        finish = "stop"
        for event in self.stream(prompt, params, slot):
            tokens.append(event.token)
            times.append(event.elapsed_s)
            if len(tokens) > 1:  # decode steps only
                for total, b in zip(totals, self.cluster.breakdowns()):
                    total.add(b)
        else:
            if len(tokens) >= min(params.max_new_tokens, self.max_seq - len(prompt)):
                finish = "length"
        steps = [b - a for a, b in zip(times, times[1:])]
        return GenerationResult(
            tokens=tokens,
            text=self.tokenizer.decode(tokens) if self.tokenizer else "",
            prompt_tokens=len(prompt),
            ttft_s=times[0] if times else 0.0,
            token_latency_s=sum(steps) / len(steps) if steps else 0.0,
            finish_reason=finish,
            step_times_s=steps,
            breakdowns=totals,
        )
