"""The KV cache grows a slot at a time and takes its room from resident weights: a device
serving one sequence keeps resident what the other slots' KV would take, and when more
slots are used it streams more, never exceeding its budget and never changing a token."""
from __future__ import annotations

import pytest

from tpi.engine import build_inproc_engine, kv_cache_bytes, prepare_store
from tpi.model.sampling import SamplingParams
from tpi.settings import ModelSettings, RuntimeOptions
from tpi.weights.budget import MemoryBudgetError
from tpi.weights.retention import block_costs, demote, plan_retention

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 9889, 30, 57, 1000], [1, 20000, 42, 7]]
CAP = 64 << 10   # blocks cut at 64 KiB, as in test_scheduler: the head streams in pieces too


def test_demote_only_streams_more_and_fits():
    costs = [10, 20] * 8                                   # 16 blocks, 240 bytes
    plan = plan_retention(costs, 2, 200)
    for budget in (180, 150, 100, 60):
        smaller = demote(costs, [False] * 16, plan, 2, budget)
        assert smaller.planned_bytes <= budget
        assert set(smaller.resident) <= set(plan.resident)          # nothing new to load
        assert set(smaller.streamed) >= set(plan.streamed)
        assert set(smaller.resident) | set(smaller.streamed) == set(range(16))
        plan = smaller
    with pytest.raises(MemoryBudgetError, match="cannot hold a window of 2 blocks"):
        demote(costs, [False] * 16, plan, 2, 39)


def test_demote_from_all_resident_opens_a_window():
    costs = [10, 20] * 4
    plan = plan_retention(costs, 2, None)
    smaller = demote(costs, [False] * 8, plan, 2, sum(costs) - 1)
    assert smaller.streamed and smaller.slots == min(2, len(smaller.streamed))
    assert smaller.planned_bytes <= sum(costs) - 1


def greedy(engine, prompts: list[list[int]]) -> list[list[int]]:
    """The prompts decoded together, one slot each, 6 tokens."""
    gen = engine.generator
    gen.stop_ids = set()
    seqs = [gen.sequence(p, SamplingParams(max_new_tokens=6), slot=s) for s, p in enumerate(prompts)]
    for seq in seqs:
        gen.prefill(seq)
    while not all(s.done for s in seqs):
        gen.decode([s for s in seqs if not s.done])
    return [s.tokens for s in seqs]


def test_new_slots_take_room_from_resident_weights(tiny_model):
    model = tiny_model("llama3")
    weights = [1.0, 1.0]
    settings = ModelSettings(str(model), weights, max_block_bytes=CAP)
    base = RuntimeOptions(dtype="float32", max_seq=64, num_slots=3, window=2)
    store = prepare_store(str(model), weights, "float32", max_block_bytes=CAP)
    one_slot = kv_cache_bytes(store, 0, base) // 3
    # everything resident beside ONE slot's KV; the full KV (3 slots) needs streaming
    budget = max(one_slot + sum(block_costs(store, r, base.torch_compute_dtype())) for r in range(2))
    assert budget - 3 * one_slot < sum(block_costs(store, 0, base.torch_compute_dtype()))
    opts = RuntimeOptions(dtype="float32", max_seq=64, num_slots=3, window=2, memory_budget=budget)

    reference = build_inproc_engine(settings, RuntimeOptions(dtype="float32", max_seq=64, num_slots=3,
                                                            scheduler=False))
    try:
        expected_one, expected_all = greedy(reference, PROMPTS[:1]), greedy(reference, PROMPTS)
    finally:
        reference.close()

    engine = build_inproc_engine(settings, opts)
    try:
        runners = engine.cluster.runners
        assert all(not r.blocks.plan.streamed and r.cache.nbytes == 0 for r in runners)
        read = [r.blocks.stats.bytes_read for r in runners]
        assert greedy(engine, PROMPTS[:1]) == expected_one
        # one slot: still everything resident, nothing read after start
        assert [r.blocks.stats.bytes_read for r in runners] == read
        assert all(r.cache.allocated == 1 and not r.blocks.plan.streamed for r in runners)

        assert greedy(engine, PROMPTS) == expected_all
        assert any(r.blocks.plan.streamed for r in runners)
        for rank, r in enumerate(runners):
            assert r.cache.allocated == 3
            needs = sum(block_costs(store, rank, opts.torch_compute_dtype())) + 3 * one_slot
            assert bool(r.blocks.plan.streamed) == (needs > budget)          # gave room to the KV
            assert r.blocks.stats.held_bytes + r.cache.nbytes <= budget
            assert r.blocks.stats.high_water_bytes <= budget - one_slot
            assert r.memory_status()["budget_bytes"] == budget
    finally:
        engine.close()
