"""Mixture of experts: the router and one device's share of the expert mix (pure maths).

Every device holds the (small) router, so every device computes the same routing for every
token. Device r holds some experts (or some columns of one expert); its partial output is

    partial[t] = sum over the chosen experts e of t that r holds:  w[t, e] * expert_e(h[t])

and the experts of every token are held by exactly one device (or their columns split across
a group, whose partial sums add up to the expert's output, `down` being row-parallel), so the
all-reduce of the partials, the same one a dense MLP uses, is the full mixture.
"""
from __future__ import annotations

from typing import Callable

import torch

from tpi.model.layers import linear

Block = dict


def route(h: torch.Tensor, router: torch.Tensor, k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h (R, H) -> the k chosen experts of each row (R, k) int64 and their weights (R, k) in h's
    dtype: softmax over all experts in float32, top k, renormalised to sum 1 if asked (HF's)."""
    logits = linear(h, router)                                        # (R, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)        # (R, E)
    top, chosen = torch.topk(probs, k, dim=-1)                        # (R, k) each
    if renormalise:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(h.dtype), chosen


def mix_experts(h: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, held: range,
                expert: Callable[[int], Block], done: Callable[[int], None],
                mlp: Callable[[torch.Tensor, Block], torch.Tensor]) -> torch.Tensor:
    """This device's partial (R, H) of the mixture for rows h (R, H): for each expert in `held`
    that some row chose, in ascending order, `expert(e)` gives its block (asked only for the
    chosen ones: the others are never read), `mlp(rows, block)` its output, `done(e)` releases it."""
    out = torch.zeros_like(h)                                         # (R, H)
    for e in sorted(set(chosen.unique().tolist()) & set(held)):
        rows, pick = torch.where(chosen == e)                         # rows routed to e; which of their k
        y = mlp(h[rows], expert(e)) * weights[rows, pick, None]       # (n, H)
        done(e)
        out.index_add_(0, rows, y)
    return out
