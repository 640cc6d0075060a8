"""GGUF's quantized tensors stay small (`--dtype gguf`): stored and held in memory at about
their size in the file, and predicting as the dequantized float32 model does."""
from __future__ import annotations

import pytest
import torch

from gguf_models import hf_from_gguf
from tpi.engine import build_inproc_engine, load_resident_runner
from tpi.settings import ModelSettings, RuntimeOptions
from tpi.weights.gguf_source import GGUFCheckpoint
from tpi.weights.slicing import HEAD_TENSORS, parse_layer_name, slice_for_device

WEIGHTS = [1.0, 2.0, 1.0]
# float32 compute: these tests measure what the stored quantized weights cost in agreement, not what
# bfloat16 arithmetic (the default since the lean defaults) adds on top of it.
GGUF_OPTS = RuntimeOptions(dtype="gguf", compute_dtype="float32", max_seq=272, scheduler=False)


def teacher_forced_tpi(path, ids: torch.Tensor) -> torch.Tensor:
    engine = build_inproc_engine(ModelSettings(str(path), WEIGHTS), GGUF_OPTS)
    try:
        with torch.no_grad():
            return engine.cluster.forward(engine.embedder.embed(ids), [0], [0], every_position=True).argmax()
    finally:
        engine.close()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_top1_agreement_with_dequantized_float32(gguf_model, qtype):
    """Teacher forcing over 256 positions: the quantized store (weights as the file holds
    them, never expanded) against transformers' float32 dequantization of the same file."""
    path = gguf_model("llama", qtype)
    ids = torch.randint(3, 49152, (1, 257), generator=torch.Generator().manual_seed(7))     # (1, 257)
    with torch.no_grad():
        want = hf_from_gguf(path)(ids).logits[0].argmax(-1)                                 # (257,)
    got = teacher_forced_tpi(path, ids)
    agreement = (got[1:] == want[1:]).float().mean().item()
    print(f"{qtype}: top-1 agreement with dequantized float32 over 256 positions: {agreement:.4f}")
    assert agreement >= 0.99


def file_share(ckpt: GGUFCheckpoint, cfg, shard) -> int:
    """Bytes of the file this device's slices come from: each tensor's bytes times the
    fraction of its elements the device holds (norms whole; tied head: embedding rows)."""
    total = 0.0
    for name in ckpt.names():
        info = ckpt.file.tensors[ckpt.gguf_of[name]]
        meta = torch.empty(info.shape, device="meta")
        parsed = parse_layer_name(name)
        if parsed is not None:
            part = slice_for_device(meta, parsed[3], cfg, shard)
        elif HEAD_TENSORS[name] == "embed" and not cfg.tie_word_embeddings:
            continue  # the master's, read row by row
        elif HEAD_TENSORS[name] in ("embed", "lm_head"):
            part = meta[shard.vocab[0] : shard.vocab[1]]
        else:
            part = meta  # the final norm
        if part is not None:
            total += info.nbytes * part.numel() / meta.numel()
    return int(total)


@pytest.mark.parametrize("family,qtype", [("llama", "Q4_K"), ("llama-tied", "Q8_0")])
def test_resident_weights_within_ten_percent_of_the_file_share(gguf_model, tmp_path, family, qtype):
    from tpi.engine import prepare_store

    path = gguf_model(family, qtype)
    store = prepare_store(str(path), WEIGHTS, "gguf", tmp_path / "store")
    ckpt = GGUFCheckpoint(path)
    for shard in store.plan.shards:
        runner = load_resident_runner(store, shard.rank, GGUF_OPTS)
        held = sum(w.nbytes for block in runner.blocks.blocks.values() for w in block.values())
        share = file_share(ckpt, store.config, shard)
        print(f"{family} {qtype} device {shard.rank}: held {held} bytes, file share {share} ({held / share:.3f}x)")
        assert abs(held / share - 1) <= 0.10


@pytest.mark.parametrize("family,qtype", [("llama", "Q4_K"), ("qwen2", "Q4_K"), ("llama-tied", "Q8_0")])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 3.0], [2.0, 1.0, 1.0, 3.0]], ids=lambda w: f"N{len(w)}")
def test_gguf_store_greedy_matches_transformers(gguf_model, gguf_greedy_reference, family, qtype, weights):
    """The quantized store, streamed under a budget on the widest device, gives transformers'
    greedy tokens (the weights are the file's, bit for bit; only float32 sums are ordered
    differently)."""
    from tpi.engine import kv_cache_bytes, prepare_store
    from tpi.model.sampling import SamplingParams
    from tpi.weights.packing import packed_copy_bytes
    from tpi.weights.retention import block_costs

    path = gguf_model(family, qtype)
    prompt = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
    expected = gguf_greedy_reference(family, qtype, prompt, 16)[:12]
    store = prepare_store(str(path), weights, "gguf")
    rank = max(range(len(weights)), key=lambda r: weights[r])
    sizes = block_costs(store, rank, torch.float32)
    assert all(packed_copy_bytes(store.files[f].tensors, torch.float32) == 0 for f in store.block_files(rank)), \
        "a gguf store's blocks (quantized forms, float32 norms) are computed as stored, with no copies"
    budget = kv_cache_bytes(store, rank, RuntimeOptions(max_seq=64)) + max(sizes) + (sum(sizes) - max(sizes)) // 4
    engine = build_inproc_engine(ModelSettings(str(path), weights), RuntimeOptions(dtype="gguf", compute_dtype="float32", max_seq=64,
                                                                    window=1, memory_budget=budget))
    try:
        engine.generator.stop_ids = set()
        got = engine.generator.generate(prompt, SamplingParams(max_new_tokens=12)).tokens
        assert engine.cluster.runners[rank].blocks.plan.streamed
    finally:
        engine.close()
    assert got == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_dtype_still_dequantizes_or_requantizes_on_purpose(gguf_model, tmp_path, dtype):
    """A GGUF source cut into a bfloat16 store (dequantized) or an int8 / int4 one
    (requantized from the dequantized weights, no group forms): each runs and predicts as
    transformers' float32 dequantization of the file does (teacher forced, 64 positions)."""
    from tpi.engine import prepare_store

    path = gguf_model("llama", "Q8_0")
    store = prepare_store(str(path), WEIGHTS, dtype, tmp_path / "store")
    assert store.dtype == dtype and not any(n.endswith(".gq") for f in store.files.values() for n in f.tensors)
    ids = torch.randint(3, 49152, (1, 65), generator=torch.Generator().manual_seed(3))     # (1, 65)
    with torch.no_grad():
        want = hf_from_gguf(path)(ids).logits[0].argmax(-1)                                 # (65,)
    engine = build_inproc_engine(ModelSettings(str(store.root), WEIGHTS), RuntimeOptions(dtype=dtype, max_seq=80))
    try:
        with torch.no_grad():
            got = engine.cluster.forward(engine.embedder.embed(ids), [0], [0], every_position=True).argmax()
    finally:
        engine.close()
    agreement = (got[1:] == want[1:]).float().mean().item()
    print(f"{dtype}: top-1 agreement with dequantized float32 over 64 positions: {agreement:.3f}")
    # int4 re-rounds weights with no structure (random normal) onto a coarser grid, and a random
    # model's logits are near ties: measured 0.27 here, far above chance (1 / 49152)
    assert agreement >= {"bfloat16": 0.9, "int8": 0.9, "int4": 0.2}[dtype]
