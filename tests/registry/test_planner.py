"""The capability planner (pure) and the capability probes."""
from __future__ import annotations

import time

import pytest

from tpi.cluster.capability import DeviceCapability, measure, probe_compute, probe_disk
from tpi.config import parse_hf_config
from tpi.plan import PlanError
from tpi.weights.budget import MemoryBudgetError
from tpi.cluster.estimate import Link, PlannerSettings, estimate, star_hops_per_token
from tpi.cluster.planner import plan_cluster, plan_weights

# SmolLM2-135M's shape: 30 layers, hidden 576, 9 query / 3 KV heads, MLP 1536, tied embeddings.
SMOLLM2 = parse_hf_config(dict(
    architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    max_position_embeddings=8192, rope_theta=100000.0,
))
GiB, MiB = 1 << 30, 1 << 20
LAN = Link(rtt_s=0.002, bandwidth_bytes_s=12.5e6)


def dev(gflops: float, budget: int = 4 * GiB, disk: float = 500.0) -> DeviceCapability:
    return DeviceCapability("aarch64", 4, 8 * GiB, budget, gflops, disk, "float32")


def test_twice_as_fast_gets_twice_the_work():
    w = plan_weights(SMOLLM2, [dev(10), dev(10), dev(20)])
    assert w[2] / w[1] == pytest.approx(2.0, rel=1e-6)
    assert w[0] == pytest.approx(w[1])
    result = plan_cluster(SMOLLM2, [dev(10), dev(10), dev(20)], [None, LAN, LAN])
    s = result.plan.shards
    assert s[0].rank == 0 and s[0].adds_row_bias  # the master stays rank 0
    assert s[2].mlp_width / s[1].mlp_width == pytest.approx(2.0, rel=0.15)
    assert s[2].num_q_heads >= 2 * s[1].num_q_heads - 1  # 9 heads cannot split exactly 1:1:2


def test_memory_budget_shifts_work_away():
    fast_but_small = dev(20, budget=150 * MiB, disk=50)
    result = plan_cluster(SMOLLM2, [dev(10), dev(10), fast_but_small], [None, LAN, LAN])
    # By speed alone it would take half; its budget holds about a quarter of the model.
    assert result.weights[2] < 0.3
    est = {e.rank: e for e in result.estimate.devices}
    assert est[2].fits and est[2].streamed_bytes == 0
    assert est[2].resident_bytes <= fast_but_small.mem_budget_bytes
    assert all(e.fits for e in est.values())
    # The plan by speed alone would make it stream from its slow disk, and be slower.
    naive = estimate(SMOLLM2, plan_cluster(SMOLLM2, [dev(10), dev(10), dev(20)]).plan,
                     [dev(10), dev(10), fast_but_small], [None, LAN, LAN])
    assert not naive.devices[2].fits and naive.devices[2].streamed_bytes > 0
    assert naive.total_ms > result.estimate.total_ms


def test_when_nothing_fits_the_overflow_streams_and_shows_in_the_estimate():
    small = [dev(10, budget=150 * MiB), dev(10, budget=150 * MiB)]
    result = plan_cluster(SMOLLM2, small, [None, LAN])
    assert result.estimate.disk_ms > 0
    assert any("streams" in n for n in result.estimate.notes)
    with pytest.raises(PlanError, match="memory budgets cannot hold the KV cache"):
        plan_cluster(SMOLLM2, [dev(10, budget=200 * MiB), dev(10, budget=40 * MiB)],
                     settings=PlannerSettings(max_seq=8192))
    # The master holds no embedding table and only its slice of the output head: a small
    # budget gives it a small share, it is not refused for the whole head (28 M parameters).
    small_master = plan_cluster(SMOLLM2, [dev(10, budget=40 * MiB), dev(10)], [None, LAN])
    assert 0 < small_master.weights[0] < 0.2
    assert small_master.estimate.devices[0].feasible
    assert small_master.plan.shards[0].vocab[1] < SMOLLM2.vocab_size / 5
    with pytest.raises(PlanError, match="device 0: memory budget 0 MiB does not even hold the norms"):
        plan_cluster(SMOLLM2, [dev(10, budget=64 * 1024), dev(10)])


def test_estimate_formula_and_breakdown():
    devices = [dev(10), dev(10), dev(10)]
    slow, fast = Link(0.004, 5e6), Link(0.001, 100e6)
    result = plan_cluster(SMOLLM2, devices, [None, slow, fast])
    e = result.estimate
    hops = star_hops_per_token(SMOLLM2.num_layers)      # 2 per all-reduce, 1 for the head's gather
    assert e.latency_ms == pytest.approx(hops * 0.004 / 2 * 1e3)          # the slowest link sets the pace
    frame = 576 * 4 + 64
    assert e.transfer_ms == pytest.approx(hops * (frame / 5e6 + frame / 100e6) * 1e3)
    # Each device scores its third of the vocabulary: the head phase is the slowest slice's.
    assert [s.vocab_size for s in result.plan.shards] == [16384] * 3
    assert e.head_ms == pytest.approx(2 * 16384 * 576 / 10e9 * 1e3)
    assert e.total_ms == pytest.approx(max(e.compute_ms + e.head_ms, e.disk_ms) + e.latency_ms + e.transfer_ms)
    d1 = e.devices[1]
    assert d1.compute_ms == pytest.approx(e.compute_ms + e.head_ms)  # equal devices, equal slices
    assert e.bottleneck == "latency"
    assert e.to_json()["devices"][1]["rank"] == 1
    # One device: no communication at all; compute is the whole model's FLOPs / its speed.
    solo = plan_cluster(SMOLLM2, [dev(10)])
    assert solo.estimate.latency_ms == 0 and solo.estimate.transfer_ms == 0
    assert solo.estimate.compute_ms > 3 * e.compute_ms * 0.9


def test_probes_are_fast_and_sane(tmp_path):
    probe_compute("float32", seconds=0.05)  # warm torch's thread pool outside the timing
    for dtype in ("float32", "bfloat16"):
        t = time.perf_counter()
        g = probe_compute(dtype)
        assert time.perf_counter() - t < 1.0 and g > 0
    t = time.perf_counter()
    mbps = probe_disk(tmp_path)
    assert time.perf_counter() - t < 1.0 and mbps > 1
    assert not list(tmp_path.iterdir())  # the probe file is gone
    cap = measure(disk_dir=tmp_path, mem_budget_bytes=GiB)
    assert cap.cores >= 1 and cap.mem_total_bytes > GiB and cap.mem_budget_bytes == GiB
    assert DeviceCapability.from_json(cap.to_json()) == cap


def test_held_bytes_follow_the_scheduler_accounting():
    # bfloat16 files computed in float32: the file's bytes plus a float32 copy.
    assert PlannerSettings("bfloat16", "float32").held_bytes == 6
    assert PlannerSettings("bfloat16", "bfloat16").held_bytes == 2
    assert PlannerSettings("int8", "float32").held_bytes == 5.5   # dequantized to float32 at load
    assert PlannerSettings("int8", "bfloat16").held_bytes == 1.5  # the kernel uses the file's bytes
    assert PlannerSettings("int4", "bfloat16").held_bytes == 1.25  # repacked for the kernel
    # gguf without the file's types: Q8_0; in bfloat16 its int4 kernel form, in float32 its
    # stored form transposed for the exact numba kernels (the same bytes again while loading)
    assert PlannerSettings("gguf", "bfloat16").held_bytes == 1.0625 + 1.125
    assert PlannerSettings("gguf", "float32").held_bytes == 1.0625 + 1.0625
    assert PlannerSettings("gguf", "float16").held_bytes == 1.0625          # computed as stored
    assert PlannerSettings("gguf", "float32", gguf_exact=True).held_bytes == 1.0625 + 1.0625
    # with them (SmolLM2's file: Q4_1 layers, a Q8_0 tied head)
    smollm2 = (("head", "Q8_0", 28311552), ("layers", "Q4_1", 106168320))
    assert PlannerSettings("gguf", "float32", gguf_types=smollm2).held_bytes == 0.625 + 0.625
    assert PlannerSettings("gguf", "float32", gguf_types=smollm2).head_held_bytes == 1.0625 + 1.0625
    assert PlannerSettings("gguf", "bfloat16", gguf_types=smollm2).head_held_bytes == 1.0625 + 1.125
    small = dev(20, budget=150 * MiB, disk=50)
    shares = {dt: plan_weights(SMOLLM2, [dev(10), dev(10), small], PlannerSettings(storage_dtype=dt))[2]
              for dt in ("bfloat16", "int8")}
    assert shares["int8"] > shares["bfloat16"]  # the same budget holds a bigger int8 slice
    with pytest.raises(PlanError, match="unknown storage dtype"):
        plan_weights(SMOLLM2, [dev(10)], PlannerSettings(storage_dtype="int3"))


# Llama-3.1-70B's shape: 80 layers, hidden 8192, 64 query / 8 KV heads, MLP 28672, 128K vocabulary, untied.
LLAMA70B = parse_hf_config(dict(
    architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    max_position_embeddings=131072, rope_theta=500000.0,
))


def test_moe_with_dense_layers_is_costed_per_layer_kind():
    """Qwen3-MoE whose layers 1 and 3 of 4 are dense (mlp_only_layers): every device's compute,
    and the total, is half that of the all-sparse model and half that of the dense Qwen3 with
    the same attention and an MLP of intermediate_size, the layers each kind of model has."""
    from tpi.plan import make_plan

    spec = dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=1024, intermediate_size=3072,
                moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                head_dim=64, num_experts=8, num_experts_per_tok=2, vocab_size=32000)
    models = {"mixed": parse_hf_config(dict(spec, mlp_only_layers=[1, 3])), "sparse": parse_hf_config(spec),
              "dense": parse_hf_config(dict(spec, architectures=["Qwen3ForCausalLM"]))}
    devices = [dev(10), dev(20), dev(15)]
    result = plan_cluster(models["mixed"], devices, [None, LAN, LAN])
    assert all(e.feasible and e.fits for e in result.estimate.devices)
    e = {name: estimate(cfg, make_plan(cfg, result.weights), devices) for name, cfg in models.items()}
    assert e["mixed"].compute_ms == pytest.approx((e["sparse"].compute_ms + e["dense"].compute_ms) / 2)
    for mixed, sparse, dense in zip(*(e[name].devices for name in ("mixed", "sparse", "dense"))):
        assert mixed.compute_ms == pytest.approx((sparse.compute_ms + dense.compute_ms) / 2)


def test_70b_on_eight_1gb_devices_streams_and_the_master_is_not_charged_the_head():
    # docs/benchmarks-memory.md (70B section): 8 devices in 1 GB each, bfloat16, window 2,
    # a 4096-token KV cache. The whole head (embedding + LM head) is 4.2 GB in bfloat16: the
    # old model charged it to the master and refused the plan.
    settings = PlannerSettings(storage_dtype="bfloat16", compute_dtype="bfloat16", max_seq=4096)
    devices = [dev(10, budget=10**9, disk=500) for _ in range(8)]
    result = plan_cluster(LLAMA70B, devices, [None] + [LAN] * 7, settings)
    assert result.weights[0] == pytest.approx(1 / 8, rel=0.02)  # equal devices, equal shares
    master = result.estimate.devices[0]
    assert master.feasible and master.resident_bytes <= 10**9
    assert result.plan.shards[0].vocab_size == 128256 // 8  # its slice of the head, no more
    per_device_kv = 2 * 80 * 1 * 4096 * 128 * 2
    assert all(e.feasible and not e.fits for e in result.estimate.devices)
    # It streams what the budget less the KV cache cannot keep: 16.6 GB/token of its 17.4 GB slice.
    slice_bytes = (80 * (8 * 128 * 8192 * 2 + 128 * 8192 * 2 + 3 * 8192 * 3584) + 16032 * 8192) * 2
    assert master.streamed_bytes >= slice_bytes - (10**9 - per_device_kv)
    assert master.streamed_bytes < slice_bytes
    # Equal finish times: the master scores no more of the vocabulary than the workers.
    assert result.estimate.head_ms == pytest.approx(2 * 16032 * 8192 / 10e9 * 1e3, rel=0.01)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_gguf_store_costs_follow_the_files_types(gguf_model, tmp_path, qtype):
    """A gguf store's pieces cost, in the estimate, what the scheduler counts for them (the
    stored forms and their int4 kernel forms), read from the file's own GGUF types."""
    import torch

    from tpi.cluster.estimate import piece_costs
    from tpi.engine import prepare_store
    from tpi.weights.gguf_source import GGUFCheckpoint
    from tpi.weights.retention import block_costs

    path = gguf_model("llama", qtype)
    store = prepare_store(str(path), [1, 2], "gguf", tmp_path / "store")
    types = GGUFCheckpoint(path).matrix_types()
    assert {t for _, t, _ in types} == {qtype}
    read = PlannerSettings("gguf", "float32", max_seq=64, gguf_types=types)
    for shard in store.plan.shards:
        real = sum(block_costs(store, shard.rank, torch.float32))
        est = sum(piece_costs(store.config, shard, read)[0])
        print(f"{qtype} device {shard.rank}: estimate {est} bytes, scheduler {real} ({est / real:.3f}x)")
        assert abs(est / real - 1) <= 0.05


@pytest.mark.parametrize("family", ["llama3", "qwen3_moe", "gemma3", "qwen3_moe_mlp_only", "qwen3_moe_sparse_step"])
def test_streamed_bytes_match_the_scheduler_on_a_real_store(tiny_model, tmp_path, family):
    """The estimate's pieces, costs and streamed set are the scheduler's own, on a real store;
    a mixture of experts' on-demand experts count at k/E of their bytes per token."""
    import torch

    from tpi.engine import prepare_store
    from tpi.cluster.estimate import piece_costs
    from tpi.weights.retention import block_costs, plan_with_experts

    # Pieces of at most 256 KiB: the head slices of this tiny model (49152 x 96) are cut.
    cap = 256 << 10
    store = prepare_store(str(tiny_model(family)), [1, 2], "bfloat16", tmp_path / "store", max_block_bytes=cap)
    cfg = store.config
    settings = PlannerSettings(storage_dtype="bfloat16", compute_dtype="float32", max_seq=64, max_block_bytes=cap)
    streaming = 0
    for shard in store.plan.shards:
        rank = shard.rank
        real = block_costs(store, rank, torch.float32)
        files = [store.files[rel].bytes for rel in store.block_files(rank)]
        costs, est_files = piece_costs(cfg, shard, settings)
        assert len(store.pieces(rank)["head"]) > 1
        assert costs == real  # the header estimate disappears in the page rounding
        assert all(abs(a - b) <= 64 for a, b in zip(est_files, files))  # the header, estimated
        kv = 2 * cfg.num_layers * shard.num_kv_heads * 64 * cfg.head_dim * 4
        experts = [kind == "expert" for _, kind, _ in store.execution_order(rank)]
        chosen = cfg.experts_per_token / cfg.num_experts if cfg.is_moe else 0.0
        for fraction in (0.25, 0.5, 0.75, 0.95, 1.0):
            budget = int(sum(real) * fraction)
            try:
                runtime = plan_with_experts(real, experts, settings.window_blocks, budget)
            except MemoryBudgetError:
                continue
            e = estimate(cfg, store.plan, [dev(10, budget=budget + kv)] * 2, settings=settings).devices[rank]
            want = sum(files[i] for i in runtime.streamed) + sum(files[i] for i in runtime.on_demand) * chosen
            # Equal up to the header estimate: at most 64 bytes per streamed file.
            assert abs(e.streamed_bytes - want) <= 64 * (len(runtime.streamed) + len(runtime.on_demand)) + 1
            assert e.fits == (not runtime.streamed and not runtime.on_demand)
            assert e.resident_bytes == kv + runtime.planned_bytes
            streaming += bool(runtime.streamed or runtime.on_demand)
    assert streaming >= 4  # most of the budgets above make the scheduler stream
