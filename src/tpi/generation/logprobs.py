"""Log probabilities from the output head's candidates, for the API's `logprobs`.

The master sees N x K candidates per position (each device's top K, tpi.model.head), not the
full vocabulary, so:
* the normalizer is the log-sum-exp over the candidates only (the mass outside them is
  left out, which overstates every log probability slightly; K = 128 keeps it small);
* a generated token is always a candidate (it was chosen from them);
* a prompt token (echo) may be outside every device's top K: its logit is then at most the
  largest of the devices' K-th best logits (it lost to K tokens of its own device), and that
  upper bound is reported. With `--head-topk` at least the largest vocabulary slice every
  token is a candidate and the values are exact up to the normalizer (then exact too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]    # the `n` most likely tokens at this position, best first


def from_logits(logits: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """logits (vocab,) float32, -inf outside the candidates; `token` one of them."""
    lp = torch.log_softmax(logits, dim=-1)                                  # (vocab,)
    return TokenLogprob(token, float(lp[token]), _top(lp, n))


def prompt_logprobs(values: torch.Tensor, ids: torch.Tensor, world_size: int, prompt: list[int],
                    n: int) -> list[TokenLogprob | None]:
    """Every prompt token's log probability given the tokens before it (None for the first),
    from the candidates of every position: values, ids (T, N*K) as tpi.model.head.Candidates
    holds them (device r's K best, sorted, in columns r*K:(r+1)*K)."""
    T = values.shape[0]
    norm = torch.logsumexp(values, dim=-1)                                  # (T,)
    kth = values.view(T, world_size, -1)[:, :, -1].max(dim=-1).values       # (T,) bound outside the candidates
    out: list[TokenLogprob | None] = [None]
    for t in range(1, len(prompt)):
        row_v, row_i = values[t - 1], ids[t - 1]
        hit = (row_i == prompt[t]).nonzero()
        logit = row_v[hit[0, 0]] if len(hit) else kth[t - 1]
        top = sorted(zip(row_i.tolist(), (row_v - norm[t - 1]).tolist()), key=lambda p: -p[1])[:n]
        out.append(TokenLogprob(prompt[t], float(logit - norm[t - 1]), top))
    return out


def _top(lp: torch.Tensor, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    v, i = torch.topk(lp, n)
    return [(int(a), float(b)) for a, b in zip(i, v) if b > float("-inf")]
