"""Speculative sampling keeps the target distribution: a statistical test on a tiny vocabulary.

A target "model" and a draft "model" are fixed random tables from a context to a
distribution over V = 3 tokens. Sequences of L = 3 tokens are generated many times through
`verify` (the target scores the row's drafts exactly as the cluster's every-position
forward does: row i is the distribution after the first i drafts), and the frequency of each
of the V^L sequences is compared with its exact probability under the target by a
chi-square test at a fixed seed. Both drafters kinds: one that samples with probabilities
(a draft model) and one that proposes without them (prompt lookup: a one-hot q)."""
from __future__ import annotations

import itertools

import pytest
import torch

from tpi.generation.speculative import verify
from tpi.model.sampling import SamplingParams

V, L, K, RUNS = 3, 3, 2, 4000
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=L)


def table(seed: int, sharpness: float) -> dict[tuple[int, ...], torch.Tensor]:
    """Logits (V,) for every context of length 0 .. L + K."""
    g = torch.Generator().manual_seed(seed)
    return {ctx: torch.randn(V, generator=g) * sharpness
            for n in range(L + K + 1) for ctx in itertools.product(range(V), repeat=n)}


TARGET, DRAFT = table(1, 1.5), table(2, 1.5)


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny tensor operations: threads would only contend (the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exact(seq: tuple[int, ...]) -> float:
    p = 1.0
    for i, tok in enumerate(seq):
        p *= float(torch.softmax(TARGET[seq[:i]], -1)[tok])
    return p


def speculative_run(rng: torch.Generator, with_probs: bool) -> tuple[int, ...]:
    out: list[int] = []
    while len(out) < L:
        draft, probs = [], []
        for _ in range(K):
            q = torch.softmax(DRAFT[tuple(out + draft)], -1)
            draft.append(int(torch.multinomial(q, 1, generator=rng)))
            probs.append(q)
        logits = torch.stack([TARGET[tuple(out + draft[:i])] for i in range(K + 1)])   # (K+1, V)
        out += verify(logits, draft, PARAMS, rng, torch.stack(probs) if with_probs else None)
    return tuple(out[:L])


@pytest.mark.parametrize("with_probs", [True, False], ids=["draft-model", "one-hot"])
def test_speculative_sampling_keeps_the_target_distribution(with_probs):
    rng = torch.Generator().manual_seed(1234)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(RUNS):
        seq = speculative_run(rng, with_probs)
        counts[seq] = counts.get(seq, 0) + 1
    outcomes = list(itertools.product(range(V), repeat=L))
    chi2 = sum((counts.get(s, 0) - RUNS * exact(s)) ** 2 / (RUNS * exact(s)) for s in outcomes)
    # 26 degrees of freedom: P(chi2 > 54.05) = 0.001
    assert chi2 < 54.05, f"chi-square {chi2:.1f}: the output does not follow the target distribution"


def test_a_biased_verifier_is_caught():
    """The test has teeth: accepting every draft gives the draft's distribution, and fails it."""
    rng = torch.Generator().manual_seed(1234)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(RUNS):
        out: list[int] = []
        while len(out) < L:
            q = torch.softmax(DRAFT[tuple(out)], -1)
            out.append(int(torch.multinomial(q, 1, generator=rng)))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    chi2 = sum((counts.get(s, 0) - RUNS * exact(s)) ** 2 / (RUNS * exact(s))
               for s in itertools.product(range(V), repeat=L))
    assert chi2 > 54.05
