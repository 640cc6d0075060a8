"""The sliding-window scheduler: same greedy tokens as everything resident under every
window and retention budget; the budget is never exceeded; a block deleted or altered
mid-run is a clear error, not a hang."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from tpi.comm.base import CommError
from tpi.settings import RuntimeOptions
from tpi.engine import build_inproc_engine, kv_cache_bytes, prepare_store
from tpi.settings import ModelSettings
from tpi.model.blocks import ResidentBlocks
from tpi.model.sampling import SamplingParams
from tpi.weights.budget import MemoryBudgetError, parse_size
from tpi.weights.scheduler import SlidingWindowBlocks
from tpi.weights.retention import block_costs, plan_retention
from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES
from tpi.weights.store import StoreError

PROMPT = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
TINY = "llama3"  # 3 layers, GQA, llama3 rope scaling
# The tiny models' output-head slice (SmolLM2's 49152-token vocabulary) is ~100x a layer
# block: cut blocks at 64 KiB so that the head streams in pieces like the layers (and the
# MLP blocks are cut in two), as a 70B model's are at the default cap.
CAP = 64 << 10


# --- planning (pure) -------------------------------------------------------------------

def test_parse_size():
    assert parse_size("800MB") == 800_000_000
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096
    assert parse_size("64 mib") == 64 << 20
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("lots")


def test_plan_everything_resident_when_it_fits():
    costs = [10, 20] * 4
    for budget in (None, sum(costs), sum(costs) + 1):
        plan = plan_retention(costs, 2, budget)
        assert plan.resident == tuple(range(8)) and plan.streamed == () and plan.slots == 0


def test_plan_refuses_a_window_that_does_not_fit():
    with pytest.raises(MemoryBudgetError, match=r"cannot hold a window of 3 blocks.*--window 2"):
        plan_retention([10, 20] * 4, 3, 59)


def test_plan_spreads_residents_and_stays_within_budget():
    costs = [10, 20] * 8                        # 16 blocks, 240 bytes
    plan = plan_retention(costs, 2, 40 + 120)   # window 2 x 20, half the slice resident
    assert plan.planned_bytes <= 160
    assert sum(costs[i] for i in plan.resident) >= 100
    # spread: no long run of streamed blocks, residents in both halves
    assert any(i < 8 for i in plan.resident) and any(i >= 8 for i in plan.resident)
    rng = random.Random(0)
    for _ in range(300):
        costs = [rng.randint(1, 50) for _ in range(rng.randint(1, 12))]
        window = rng.randint(1, 4)
        budget = rng.randint(window * max(costs), max(window * max(costs), sum(costs)) + 10)
        plan = plan_retention(costs, window, budget)
        held = sum(costs[i] for i in plan.resident) + plan.slots * max((costs[i] for i in plan.streamed), default=0)
        assert held <= budget
        assert sorted(plan.resident + plan.streamed) == list(range(len(costs)))


def test_plan_keeps_a_big_block_resident_when_that_shrinks_every_slot():
    costs = [10] * 8 + [40]                     # e.g. 8 MLP pieces and one big head slice
    plan = plan_retention(costs, 2, 80)
    assert 8 in plan.resident and plan.slot_cost == 10
    assert sum(costs[i] for i in plan.streamed) == 60   # sizing slots by the big block: 120
    assert plan.planned_bytes <= 80


# --- end to end on the in-process cluster ----------------------------------------------

def slice_bytes(store, rank):
    """Bytes of every file the device streams: its layer blocks and its output-head slice."""
    return [store.files[rel].bytes for rel in store.block_files(rank)]


def slice_costs(store, rank, compute_dtype=torch.float32):
    """Bytes each of those blocks holds once loaded (the scheduler's budget rule)."""
    return block_costs(store, rank, compute_dtype)


def budget_for(store, opts, window, fraction):
    """A per-device budget: KV cache + `window` largest blocks + `fraction` of the slice."""
    return max(kv_cache_bytes(store, r, opts) + window * max(slice_costs(store, r, opts.torch_compute_dtype()))
               + int(fraction * sum(slice_costs(store, r, opts.torch_compute_dtype())))
               for r in range(store.plan.world_size))


def run(model, weights, opts, new_tokens=10, cap=CAP):
    engine = build_inproc_engine(ModelSettings(str(model) if model else None, weights, max_block_bytes=cap), opts)
    try:
        engine.generator.stop_ids = set()
        tokens = engine.generator.generate(PROMPT, SamplingParams(max_new_tokens=new_tokens)).tokens
        return tokens, [r.blocks for r in engine.cluster.runners]
    finally:
        engine.close()


def check_within_budget(blocks, opts, store):
    for rank, b in enumerate(blocks):
        assert isinstance(b, SlidingWindowBlocks)
        limit = opts.memory_budget - kv_cache_bytes(store, rank, opts)
        assert b.stats.high_water_bytes <= limit, (rank, b.describe())
        assert b.stats.held_bytes <= limit


SCHEDULES = [  # (window, fraction of the slice kept resident)
    (1, 0.0), (2, 0.0), (4, 0.0), (2, 0.5), (1, 0.3), (2, 0.25),
]


@pytest.mark.parametrize("devices", [2, 3])
def test_tiny_greedy_same_under_every_schedule(tiny_model, devices):
    model = tiny_model(TINY)
    weights = [1.0] * devices
    base = RuntimeOptions(dtype="float32", max_seq=64)
    store = prepare_store(str(model), weights, "float32", max_block_bytes=CAP)
    expected, blocks = run(model, weights, RuntimeOptions(dtype="float32", max_seq=64, scheduler=False))
    assert all(isinstance(b, ResidentBlocks) for b in blocks)
    for window, fraction in SCHEDULES:
        opts = RuntimeOptions(dtype="float32", max_seq=64, window=window,
                              memory_budget=budget_for(store, base, window, fraction))
        tokens, blocks = run(model, weights, opts)
        assert tokens == expected, (window, fraction)
        check_within_budget(blocks, opts, store)
        # (one budget for all: the device with the largest slice streams for sure)
        streaming = [b for b in blocks if b.plan.streamed]
        assert streaming, (window, fraction)
        if fraction:
            assert all(b.plan.resident for b in streaming), (window, fraction)
        # steady-state streaming re-reads blocks but hashes each file once
        for b in streaming:
            assert b.stats.files_read > len(b.order)
            assert b.stats.sha256_checks == len(b.order)


def test_smollm2_greedy_same_under_streaming_and_retention(smollm2_dir):
    weights = [1.0] * 3
    base = RuntimeOptions(dtype="bfloat16", compute_dtype="bfloat16", max_seq=64)
    store = prepare_store(str(smollm2_dir), weights, "bfloat16")
    cap = DEFAULT_MAX_BLOCK_BYTES  # SmolLM2's blocks and head slices are all below it: one piece each
    expected, _ = run(smollm2_dir, weights, RuntimeOptions(dtype="bfloat16", compute_dtype="bfloat16", max_seq=64, scheduler=False), 8, cap)
    for window, fraction in [(1, 0.5), (2, 0.0), (4, 0.25)]:
        opts = RuntimeOptions(dtype="bfloat16", compute_dtype="bfloat16", max_seq=64, window=window,
                              memory_budget=budget_for(store, base, window, fraction))
        tokens, blocks = run(smollm2_dir, weights, opts, 8, cap)
        assert tokens == expected, (window, fraction)
        check_within_budget(blocks, opts, store)


def test_budget_holding_the_slice_reads_nothing_after_start(tiny_model):
    model = tiny_model(TINY)
    store = prepare_store(str(model), [1.0, 1.0], "float32", max_block_bytes=CAP)
    opts = RuntimeOptions(dtype="float32", max_seq=64, memory_budget=budget_for(store, RuntimeOptions(max_seq=64, dtype="float32"), 0, 1.0))
    engine = build_inproc_engine(ModelSettings(str(model), [1.0, 1.0], max_block_bytes=CAP), opts)
    try:
        blocks = [r.blocks for r in engine.cluster.runners]
        assert all(not b.plan.streamed for b in blocks)
        read = [b.stats.bytes_read for b in blocks]
        assert read == [sum(slice_bytes(store, r)) for r in range(2)]
        engine.generator.generate(PROMPT, SamplingParams(max_new_tokens=6))
        assert [b.stats.bytes_read for b in blocks] == read
        assert all(b.stats.high_water_bytes <= sum(slice_costs(store, r)) for r, b in enumerate(blocks))
    finally:
        engine.close()


def test_conversions_are_counted_in_the_budget(tiny_model):
    """bfloat16 blocks computed in float32 are copied; the copies count too."""
    model = tiny_model(TINY)
    store = prepare_store(str(model), [1.0, 1.0], "bfloat16", max_block_bytes=CAP)
    opts = RuntimeOptions(dtype="bfloat16", compute_dtype="float32", max_seq=64)
    kv = kv_cache_bytes(store, 0, opts)
    # each loaded block costs its file plus a float32 copy (about 3x the file)
    costs = slice_costs(store, 0, torch.float32)
    budget = kv + 2 * max(costs) + sum(costs) // 2
    opts = RuntimeOptions(dtype="bfloat16", compute_dtype="float32", max_seq=64, memory_budget=budget)
    tokens, blocks = run(model, [1.0, 1.0], opts)
    expected, _ = run(model, [1.0, 1.0], RuntimeOptions(dtype="bfloat16", compute_dtype="float32",
                                                       max_seq=64, scheduler=False))
    assert tokens == expected
    check_within_budget(blocks, opts, store)
    assert blocks[0].plan.streamed and blocks[0].plan.resident
    assert blocks[0].stats.high_water_bytes > 2 * 3 * max(slice_bytes(store, 0))


def test_budget_too_small_for_the_window_is_refused(tiny_model):
    model = tiny_model(TINY)
    store = prepare_store(str(model), [1.0, 1.0], "float32", max_block_bytes=CAP)
    opts = RuntimeOptions(dtype="float32", max_seq=64, window=2)
    small = kv_cache_bytes(store, 0, opts) + max(slice_costs(store, 0)) + 1
    with pytest.raises(MemoryBudgetError, match="cannot hold a window of 2 blocks"):
        build_inproc_engine(ModelSettings(str(model), [1.0, 1.0], max_block_bytes=CAP), RuntimeOptions(dtype="float32", max_seq=64, memory_budget=small))
    with pytest.raises(MemoryBudgetError, match="does not even hold the KV cache"):
        build_inproc_engine(ModelSettings(str(model), [1.0, 1.0], max_block_bytes=CAP), RuntimeOptions(dtype="float32", max_seq=64, memory_budget=1000))


def test_streamed_blocks_are_views_of_the_window_buffers(tiny_model):
    model = tiny_model(TINY)
    store = prepare_store(str(model), [1.0, 1.0], "float32", max_block_bytes=CAP)
    src = SlidingWindowBlocks(store, 1, window=2, budget_bytes=2 * max(slice_costs(store, 1)),
                              compute_dtype=torch.float32)
    try:
        assert not src.plan.resident
        buffers = {s.buffer.untyped_storage().data_ptr() for s in src.slots}
        assert len(buffers) == 2
        for layer in range(store.config.num_layers):
            for kind in ("attn", "mlp"):
                blk = src.get(layer, kind)
                assert all(t.untyped_storage().data_ptr() in buffers for t in blk.values())
                ref = store.load_block(1, layer, kind)
                assert all(torch.equal(blk[k], ref[k]) for k in ref)
                src.release(layer, kind)
        assert src.stats.held_bytes == 2 * max(slice_costs(store, 1))
    finally:
        src.close()


# --- integrity mid-run -----------------------------------------------------------------

@pytest.fixture
def private_store(tiny_model, tmp_path):
    """A store of its own (the tests below damage it), streamed with window 2."""
    model = tiny_model(TINY)
    store = prepare_store(str(model), [1.0, 1.0], "float32", out=tmp_path / "store", max_block_bytes=CAP)
    opts = RuntimeOptions(dtype="float32", max_seq=64, window=2)
    budget = max(kv_cache_bytes(store, r, opts) + 2 * max(slice_costs(store, r)) for r in range(2))
    return model, store, RuntimeOptions(dtype="float32", max_seq=64, window=2, memory_budget=budget)


def engine_on(store, opts):
    from tpi.cluster import InProcCluster
    from tpi.engine import build_engine, build_runner

    runners = [build_runner(store, r, opts, devices_in_process=2) for r in range(2)]
    engine = build_engine(store, InProcCluster(runners, timeout_s=20), opts)
    engine.generator.stop_ids = set()
    return engine


@pytest.mark.timeout(120)
def test_deleted_block_file_is_a_clear_error_then_recovers(private_store):
    _, store, opts = private_store
    engine = engine_on(store, opts)
    try:
        params = SamplingParams(max_new_tokens=4)
        expected = engine.generator.generate(PROMPT, params).tokens
        rel = store.piece_path(0, *engine.cluster.runners[0].blocks.streamed[-1])
        victim = store.root / rel
        kept = victim.with_name("kept")
        shutil.move(victim, kept)
        with pytest.raises(StoreError, match=rf"block file missing: .*{rel}"):
            engine.generator.generate(PROMPT, params)
        shutil.move(kept, victim)
        assert engine.generator.generate(PROMPT, params).tokens == expected
    finally:
        engine.close()


@pytest.mark.timeout(120)
def test_altered_block_file_is_a_clear_error(private_store):
    _, store, opts = private_store
    engine = engine_on(store, opts)
    try:
        params = SamplingParams(max_new_tokens=4)
        expected = engine.generator.generate(PROMPT, params).tokens
        rel = store.piece_path(1, *engine.cluster.runners[1].blocks.streamed[-1])
        victim = store.root / rel
        original = victim.read_bytes()
        damaged = bytearray(original)
        damaged[-100] ^= 0xFF  # same size, one weight byte flipped, in place
        with open(victim, "r+b") as f:
            f.write(damaged)
        # device 1's StoreError reaches the caller through the in-process cluster's abort
        with pytest.raises((StoreError, CommError), match=rf"{rel} failed its sha256 check"):
            engine.generator.generate(PROMPT, params)
        with open(victim, "r+b") as f:
            f.write(original)
        assert engine.generator.generate(PROMPT, params).tokens == expected
    finally:
        engine.close()


# --- the command line --------------------------------------------------------------------

def test_generate_json_reports_breakdown_per_device_and_layer(tiny_model, capsys):
    from tpi_cli.main import main

    model = tiny_model(TINY)
    code = main(["generate", "--model", str(model), "--devices", "2", "--dtype", "float32", "--prompt", "Hello",
                 "--max-new-tokens", "4", "--max-seq", "64", "--window", "1", "--memory-budget", "200KB",
                 "--max-block-size", "64KiB",
                 "--kv-dtype", "bfloat16", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["devices"]) == 2
    for dev in out["devices"]:
        assert len(dev["per_token"]["layers"]) == 3
        assert set(dev["per_token"]) >= {"compute_s", "comm_s", "disk_wait_s"}
        assert dev["blocks"]["window"] == 1 and dev["blocks"]["high_water_bytes"] <= dev["blocks"]["budget_bytes"]
    code = main(["generate", "--model", str(model), "--devices", "2", "--dtype", "float32", "--prompt", "Hello",
                 "--max-new-tokens", "2", "--max-seq", "64", "--memory-budget", "1KB"])
    assert code == 2
    assert "does not even hold the KV cache" in capsys.readouterr().err
