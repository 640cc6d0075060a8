"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seed; and the
distribution a sampled token is drawn from (speculative decoding compares it with a drafter's)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0 means greedy
    top_k: int = 0                # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., vocab) -> the same after temperature, top-k and top-p (cut tokens -inf)."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop tokens once the mass before them already reaches top_p (always keep the first)
        drop = probs.cumsum(-1) - probs > params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., vocab) -> the distribution a sampled token is drawn from (not for greedy)."""
    return torch.softmax(filtered_logits(logits, params), dim=-1)


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits (vocab,) float32 -> token id."""
    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))
