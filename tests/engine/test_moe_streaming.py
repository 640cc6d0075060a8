"""A mixture of experts under a memory budget: the dense blocks keep their sliding-window
plan, experts that do not fit are read only when the router chooses them, and the greedy
tokens stay those of transformers."""
from __future__ import annotations

import pytest

from reference import hf_greedy
from tpi.engine import build_inproc_engine, kv_cache_bytes, prepare_store
from tpi.model.sampling import SamplingParams
from tpi.settings import ModelSettings, RuntimeOptions
from tpi.weights.retention import block_costs

PROMPT = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
NEW_TOKENS = 12


def moe_budget(store, rank: int, opts: RuntimeOptions, resident_experts: int) -> int:
    """KV cache + every dense block + room for the largest expert and `resident_experts` more."""
    order = store.execution_order(rank)
    costs = block_costs(store, rank, opts.torch_compute_dtype())
    dense = sum(c for (_, kind, _), c in zip(order, costs) if kind != "expert")
    expert = max(c for (_, kind, _), c in zip(order, costs) if kind == "expert")
    return kv_cache_bytes(store, rank, opts) + dense + (1 + resident_experts) * expert


# The budget holds the dense blocks, the experts' slot and `resident` experts more: Mixtral's
# devices hold 4 and 3 experts a layer (8 and 6 blocks), Qwen3-MoE's 1 (2 blocks).
@pytest.mark.parametrize("family,weights,resident", [("mixtral", [1.0, 1.0], 1), ("qwen3_moe", [1.0, 1.0, 1.0], 0)])
def test_cold_experts_stay_on_disk(tiny_model, family, weights, resident):
    model_dir = tiny_model(family)
    expected = hf_greedy(model_dir, PROMPT, NEW_TOKENS)
    base = RuntimeOptions(dtype="float32", max_seq=64)
    store = prepare_store(str(model_dir), weights, base.dtype)
    budget = max(moe_budget(store, r, base, resident_experts=resident) for r in range(len(weights)))
    opts = RuntimeOptions(dtype="float32", max_seq=64, memory_budget=budget)
    engine = build_inproc_engine(ModelSettings(str(model_dir), weights), opts)
    try:
        engine.generator.stop_ids = set()
        sources = [runner.blocks for runner in engine.cluster.runners]
        before = [s.stats.bytes_read for s in sources]
        tokens = engine.generator.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS)).tokens
        assert tokens == expected
        cfg = store.config
        for rank, s in enumerate(sources):
            d = s.describe()
            assert d["on_demand_blocks"] > 0 and d["streamed_blocks"] == 0, d  # dense all resident here
            assert s.stats.high_water_bytes <= budget - kv_cache_bytes(store, rank, opts), d
            # Every byte read after start-up is a chosen expert: at most k of E experts per token
            # and layer, so well below reading each on-demand expert on every step.
            per_expert = max(store.files[store.piece_path(rank, *store.execution_order(rank)[i])].bytes
                             for i in s.plan.on_demand)
            steps = NEW_TOKENS  # one prefill + NEW_TOKENS - 1 decode steps
            read = s.stats.bytes_read - before[rank]
            assert 0 < read <= steps * cfg.num_layers * min(cfg.experts_per_token, len(s.plan.on_demand)) * per_expert
            assert read < steps * len(s.plan.on_demand) * per_expert
    finally:
        engine.close()
