"""Verifying draft tokens: which of a row's K proposed tokens the target model accepts.

The cluster scores the row's last token and its K draft tokens in ONE forward (T = K + 1
positions, `every_position`), giving target logits z_0 .. z_K: z_i is the distribution of the
token after the first i drafts. Then, in order (Leviathan et al. 2023, Chen et al. 2023):

* greedy: draft i is accepted while it equals argmax z_i; the first mismatch is replaced by
  argmax z_i; if all K are accepted, argmax z_K follows. The tokens are exactly plain greedy
  decoding's (each is the argmax given the same prefix).
* sampling: with p_i the target's probabilities (after temperature, top-k, top-p) and q_i
  the drafter's (a one-hot row for a drafter that proposes without probabilities, such as
  prompt lookup), draft d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the
  first rejected one is replaced by a sample of norm(max(0, p_i - q_i)); if all K are
  accepted, a sample of p_K follows. Each emitted token is then distributed exactly as p
  given its prefix, so the output keeps the target distribution.

So a step emits between 1 and K + 1 tokens."""
from __future__ import annotations

import torch

from tpi.model.sampling import SamplingParams, choose_token, probabilities


def verify(logits: torch.Tensor, draft: list[int], params: SamplingParams, rng: torch.Generator | None,
           draft_probs: torch.Tensor | None = None) -> list[int]:
    """logits (K+1, vocab) float32 of the row's last token and its K drafts -> the tokens it
    emits: the accepted drafts, then one token of the target's own."""
    if params.greedy:
        targets = logits.argmax(-1).tolist()                                     # (K+1,)
        n = 0
        while n < len(draft) and draft[n] == targets[n]:
            n += 1
        return draft[:n] + [targets[n]]
    p = probabilities(logits, params)                                            # (K+1, vocab)
    for i, d in enumerate(draft):
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if q_d > 0 and float(torch.rand((), generator=rng)) * q_d < float(p[i, d]):
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - draft_probs[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p_i == q_i: the draft could not have been rejected
            residual = p[i]
        return draft[:i] + [int(torch.multinomial(residual, 1, generator=rng))]
    return draft + [choose_token(logits[len(draft)], params, rng)]
