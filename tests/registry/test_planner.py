"""The capability planner (pure) and the capability probes."""
from __future__ import annotations

import time

import pytest

from tpi.capability import DeviceCapability, measure, probe_compute, probe_disk
from tpi.config import parse_hf_config
from tpi.plan import PlanError
from tpi.planner import (
    HOPS_PER_ALL_REDUCE, Link, PlannerSettings, all_reduces_per_token, estimate, plan_cluster, plan_weights,
)

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
    with pytest.raises(PlanError, match="device 0: memory budget 40 MiB does not even hold the head"):
        plan_cluster(SMOLLM2, [dev(10, budget=40 * MiB), dev(10)])


def test_estimate_formula_and_breakdown():
    devices = [dev(10), dev(10), dev(10)]
    slow, fast = Link(0.004, 5e6), Link(0.001, 100e6)
    result = plan_cluster(SMOLLM2, devices, [None, slow, fast])
    e = result.estimate
    hops = all_reduces_per_token(SMOLLM2.num_layers) * HOPS_PER_ALL_REDUCE
    assert e.latency_ms == pytest.approx(hops * 0.004 / 2 * 1e3)          # the slowest link sets the pace
    frame = 576 * 4 + 64
    assert e.transfer_ms == pytest.approx(hops * (frame / 5e6 + frame / 100e6) * 1e3)
    assert e.head_ms == pytest.approx(2 * 49152 * 576 / 10e9 * 1e3)
    assert e.total_ms == pytest.approx(e.head_ms + max(e.compute_ms, e.disk_ms) + e.latency_ms + e.transfer_ms)
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
    small = dev(20, budget=150 * MiB, disk=50)
    shares = {dt: plan_weights(SMOLLM2, [dev(10), dev(10), small], PlannerSettings(storage_dtype=dt))[2]
              for dt in ("bfloat16", "int8")}
    assert shares["int8"] > shares["bfloat16"]  # the same budget holds a bigger int8 slice
    with pytest.raises(PlanError, match="unknown storage dtype"):
        plan_weights(SMOLLM2, [dev(10)], PlannerSettings(storage_dtype="int3"))
