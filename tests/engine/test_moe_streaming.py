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
# devices hold 4 and 3 experts a layer (8 and 6 blocks), Qwen3-MoE's 1 (2 blocks). The Qwen3-MoE
# variants with dense MLP layers keep those resident with the rest of the non-expert blocks.
@pytest.mark.parametrize("family,weights,resident", [
    ("mixtral", [1.0, 1.0], 1), ("qwen3_moe", [1.0, 1.0, 1.0], 0),
    ("qwen3_moe_mlp_only", [1.0, 1.0], 0), ("qwen3_moe_sparse_step", [1.0, 1.0, 1.0], 0)])
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


@pytest.mark.parametrize("family,weights", [("qwen3_moe_mlp_only", [2.0, 1.0, 1.0]), ("qwen3_moe_sparse_step", [1.0, 2.0])])
def test_dense_layers_stream_as_dense(tiny_model, tmp_path, family, weights):
    """A budget below the non-expert blocks: the dense MLP layers' pieces are streamed through
    the sliding window every token, like a dense model's, while the experts stay on disk until
    the router chooses them; tokens unchanged, every device within its budget."""
    model_dir = tiny_model(family)
    expected = hf_greedy(model_dir, PROMPT, NEW_TOKENS)
    base = RuntimeOptions(dtype="float32", max_seq=64)
    cap = 32 << 10  # the dense layers' MLP (3 x 96 x its columns x 4 bytes) is cut into pieces
    settings = ModelSettings(str(model_dir), weights, max_block_bytes=cap)
    store = prepare_store(str(model_dir), weights, base.dtype, max_block_bytes=cap)
    budgets = []  # the KV cache, the experts' slot and a tenth of the other blocks
    for rank in range(len(weights)):
        costs = block_costs(store, rank, base.torch_compute_dtype())
        kinds = [kind for _, kind, _ in store.execution_order(rank)]
        experts = [c for c, kind in zip(costs, kinds) if kind == "expert"]
        budgets.append(kv_cache_bytes(store, rank, base) + max(experts) + (sum(costs) - sum(experts)) // 10)
    opts = RuntimeOptions(dtype="float32", max_seq=64, memory_budget=max(budgets))
    engine = build_inproc_engine(settings, opts)
    try:
        engine.generator.stop_ids = set()
        sources = [runner.blocks for runner in engine.cluster.runners]
        before = [s.stats.bytes_read for s in sources]
        assert engine.generator.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS)).tokens == expected
        cfg = store.config
        for rank, s in enumerate(sources):
            streamed = [s.order[i] for i in s.plan.streamed]
            assert any(kind == "dense" for _, kind, _ in streamed), streamed
            assert len(store.pieces(rank)["dense"]) > 1
            assert s.plan.on_demand and all(s.order[i][1] == "expert" for i in s.plan.on_demand)
            assert s.stats.high_water_bytes <= opts.memory_budget - kv_cache_bytes(store, rank, opts)
            # Per step: every streamed piece once, and at most k chosen experts per sparse layer.
            files = [store.files[store.piece_path(rank, *key)].bytes for key in s.order]
            sparse = cfg.num_layers - len(cfg.dense_layers)
            per_step = sum(files[i] for i in s.plan.streamed) \
                + sparse * cfg.experts_per_token * max(files[i] for i in s.plan.on_demand)
            read = s.stats.bytes_read - before[rank]
            assert sum(files[i] for i in s.plan.streamed) * NEW_TOKENS <= read <= per_step * NEW_TOKENS
    finally:
        engine.close()
