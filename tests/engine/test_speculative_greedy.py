"""Speculative decoding on the real engine: greedy output equals plain decoding for 1 to 4
devices and uneven splits, whether every draft is accepted, drafts are rejected (a drafter
that proposes wrong tokens) or the drafters are the product's (prompt lookup, a draft
model); rows of one batch accept different counts; rejected positions stay behind in every
device's KV cache and change nothing (the rollback is by position)."""
from __future__ import annotations

import random

import pytest
import torch

from tpi.engine import build_inproc_engine
from tpi.generation.draft import Draft, DraftModel, PromptLookup
from tpi.model.sampling import SamplingParams
from tpi.settings import ModelSettings, RuntimeOptions

NEW = 24
PROMPTS = [[1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000],
           [1, 77, 88, 99, 504, 3458, 282, 77, 88],
           [1, 12, 13, 14, 15, 12, 13]]
GREEDY = SamplingParams(max_new_tokens=NEW)


class Oracle:
    """Proposes the plain run's own continuation: every draft is accepted."""

    def __init__(self, expected: dict[tuple[int, ...], list[int]]):
        self.expected = expected

    def propose(self, seqs, ks):
        return [Draft(self.expected[tuple(s.prompt)][len(s.tokens):len(s.tokens) + k]) for s, k in zip(seqs, ks)]


class Wrong(Oracle):
    """A correct prefix of random length, then wrong tokens: drafts are rejected part-way."""

    def __init__(self, expected, seed: int = 0):
        super().__init__(expected)
        self.rng = random.Random(seed)

    def propose(self, seqs, ks):
        out = []
        for d, k in zip(super().propose(seqs, ks), ks):
            good = self.rng.randint(0, len(d.tokens))
            out.append(Draft(d.tokens[:good] + [(t + 1) % 49152 for t in d.tokens[good:]] + [5] * (k - len(d.tokens))))
        return out


def engine(model_dir, weights, slots=1):
    eng = build_inproc_engine(ModelSettings(str(model_dir), weights),
                              RuntimeOptions(dtype="float32", max_seq=128, num_slots=slots))
    eng.generator.stop_ids = set()
    return eng


def run(eng, drafter, k=4, prompts=PROMPTS, speculative=None):
    """Every prompt in its own slot, decoded together; (tokens, drafted, accepted) per prompt."""
    gen = eng.generator
    gen.drafter, gen.draft_tokens = drafter, k
    seqs = [gen.sequence(p, GREEDY, slot=i, speculative=True if speculative is None else speculative[i])
            for i, p in enumerate(prompts)]
    for s in seqs:
        gen.prefill(s)
    while live := [s for s in seqs if not s.done]:
        gen.decode(live)
    return [(s.tokens, s.drafted, s.accepted) for s in seqs]


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0], [1.0, 1.0, 3.0], [2.0, 1.0, 1.0, 1.0]],
                         ids=lambda w: f"N{len(w)}")
def test_speculative_greedy_equals_plain(tiny_model, weights):
    eng = engine(tiny_model("llama3"), weights, slots=len(PROMPTS))
    try:
        plain = [t for t, _, _ in run(eng, None)]
        assert all(len(set(t)) > 3 for t in plain), "degenerate reference"
        expected = {tuple(p): t for p, t in zip(PROMPTS, plain)}

        oracle = run(eng, Oracle(expected))
        assert [t for t, _, _ in oracle] == plain
        assert all(acc == drafted > 0 for _, drafted, acc in oracle)         # every draft accepted

        wrong = run(eng, Wrong(expected))
        assert [t for t, _, _ in wrong] == plain
        drafted, accepted = sum(r[1] for r in wrong), sum(r[2] for r in wrong)
        assert 0 < accepted < drafted                                         # rejections happened

        assert [t for t, _, _ in run(eng, PromptLookup())] == plain
    finally:
        eng.close()


def test_rows_of_one_batch_accept_different_counts(tiny_model):
    eng = engine(tiny_model("qwen2"), [1.0, 2.0], slots=len(PROMPTS))
    try:
        plain = [t for t, _, _ in run(eng, None)]
        expected = {tuple(p): t for p, t in zip(PROMPTS, plain)}

        class Mixed(Wrong):  # row 0 all right, row 1 part-wrong; row 2 opts out below
            def propose(self, seqs, ks):
                right, wrong = Oracle.propose(self, seqs, ks), Wrong.propose(self, seqs, ks)
                return [right[i] if s.prompt == PROMPTS[0] else wrong[i] for i, s in enumerate(seqs)]

        mixed = run(eng, Mixed(expected), speculative=[True, True, False])
        assert [t for t, _, _ in mixed] == plain
        (_, d0, a0), (_, d1, a1), (_, d2, _) = mixed
        assert a0 == d0 > 0 and a1 < d1 and d2 == 0
    finally:
        eng.close()


def test_draft_model_gives_the_same_text(tiny_model, smollm2_dir):
    """A draft model on the master: the target itself (drafts accepted) and an unrelated random
    model of the same vocabulary (mostly rejected); both leave the greedy text unchanged."""
    target = engine(tiny_model("llama-tied"), [1.0, 1.0], slots=len(PROMPTS))
    drafts = [engine(tiny_model("llama-tied"), [1.0], slots=len(PROMPTS)),
              engine(tiny_model("mistral"), [1.0], slots=len(PROMPTS))]
    try:
        plain = [t for t, _, _ in run(target, None)]
        same, other = (run(target, DraftModel(d, "draft"), k=3) for d in drafts)
        assert [t for t, _, _ in same] == plain and [t for t, _, _ in other] == plain
        assert sum(r[2] for r in same) > 0.9 * sum(r[1] for r in same)
        assert sum(r[2] for r in other) < sum(r[1] for r in other)
    finally:
        for e in (target, *drafts):
            e.close()


def test_rejected_positions_stay_in_the_cache_and_change_nothing(tiny_model):
    """After a step whose drafts were rejected, every device's cache still holds keys past the
    sequence's position (the rollback moves the position, it does not erase); the next tokens
    are the plain ones, because those entries are overwritten before anything reads them."""
    eng = engine(tiny_model("llama3"), [1.0, 2.0])
    try:
        plain = run(eng, None, prompts=PROMPTS[:1])[0][0]
        gen = eng.generator

        class AllWrong:
            def propose(self, seqs, ks):
                return [Draft([(plain[len(s.tokens)] + 1) % 49152] * k) for s, k in zip(seqs, ks)]

        gen.drafter, gen.draft_tokens = AllWrong(), 4
        seq = gen.sequence(PROMPTS[0], GREEDY)
        gen.prefill(seq)
        step = gen.decode([seq])
        assert step.advances[0].accepted == 0 and step.advances[0].drafted == 4
        for runner in eng.cluster.runners:                     # stale keys past the position
            stale = runner.cache.keys(0)[:, :, seq.pos:seq.pos + 4]
            assert stale.abs().sum() > 0
        gen.drafter = None
        while not seq.done:
            gen.decode([seq])
        assert seq.tokens == plain
    finally:
        eng.close()
