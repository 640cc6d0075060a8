"""GGUF's quantized tensors stay small (`--dtype gguf`): stored and held in memory at about
their size in the file, and predicting as the dequantized float32 model does."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gguf_models import hf_from_gguf
from tpi.engine import build_inproc_engine, load_resident_runner
from tpi.settings import ModelSettings, RuntimeOptions
from tpi.weights.gguf_source import GGUFCheckpoint
from tpi.weights.slicing import HEAD_TENSORS, parse_layer_name, slice_for_device

WEIGHTS = [1.0, 2.0, 1.0]
# The defaults a GGUF source gets (a gguf store, float32 activations around the int4 kernel).
GGUF_OPTS = RuntimeOptions(max_seq=272, scheduler=False)


def teacher_forced_tpi(path, ids: torch.Tensor, stepwise: bool, opts: RuntimeOptions = GGUF_OPTS,
                       weights: list[float] = WEIGHTS) -> torch.Tensor:
    """Top-1 per position of ids (1, T) on devices of `weights`: one forward of all T rows (a
    prefill: the weights dequantized to float32), or T forwards of one row each (decode: the kernel)."""
    engine = build_inproc_engine(ModelSettings(str(path), weights), opts)
    try:
        assert engine.store.dtype == "gguf"
        with torch.no_grad():
            if not stepwise:
                return engine.cluster.forward(engine.embedder.embed(ids), [0], [0], every_position=True).argmax()
            return torch.cat([engine.cluster.forward(engine.embedder.embed(ids[:, t : t + 1]), [0], [t]).argmax()
                              for t in range(ids.shape[1])])
    finally:
        engine.close()


@pytest.mark.parametrize("path_kind", ["prefill", "decode", "exact"])
@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_top1_agreement_with_dequantized_float32(gguf_model, qtype, path_kind):
    """Teacher forcing over 256 positions: the quantized store (weights as the file holds
    them, never expanded) against transformers' float32 dequantization of the same file,
    through the prefill rows' path and, token by token, through the decode rows' path."""
    path = gguf_model("llama", qtype)
    ids = torch.randint(3, 49152, (1, 257), generator=torch.Generator().manual_seed(7))     # (1, 257)
    with torch.no_grad():
        want = hf_from_gguf(path)(ids).logits[0].argmax(-1)                                 # (257,)
    exact = replace(GGUF_OPTS, compute_dtype="float32")     # the stored forms, token by token
    got = teacher_forced_tpi(path, ids, stepwise=path_kind != "prefill", opts=exact if path_kind == "exact" else GGUF_OPTS)
    agreement = (got[1:] == want[1:]).float().mean().item()
    print(f"{qtype} {path_kind}: top-1 agreement with dequantized float32 over 256 positions: {agreement:.4f}")
    # The target: 99%. Both paths compute the file's weights in float32 (numba
    # kernels, tpi.weights.gguf_exact): 100% measured; the int4 kernel's forms (bfloat16
    # scales and outputs, what bfloat16 compute or a device without numba uses) gave 97-98%
    # here (docs/quantization.md).
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


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("family,qtype", [("llama", "Q4_K"), ("llama-tied", "Q8_0")])
def test_resident_weights_within_ten_percent_of_the_file_share(gguf_model, tmp_path, family, qtype, exact):
    from tpi.engine import prepare_store

    path = gguf_model(family, qtype)
    store = prepare_store(str(path), WEIGHTS, "gguf", tmp_path / "store")
    ckpt = GGUFCheckpoint(path)
    for shard in store.plan.shards:
        opts = replace(GGUF_OPTS, compute_dtype="float32" if exact else None).for_source(str(path))
        runner = load_resident_runner(store, shard.rank, opts)
        held = sum(w.nbytes for block in runner.blocks.blocks.values() for w in block.values())
        share = file_share(ckpt, store.config, shard)
        print(f"{family} {qtype} {'exact' if exact else 'default'} device {shard.rank}: held {held} bytes, "
              f"file share {share} ({held / share:.3f}x)")
        # The target: within 10%. Measured 1.029x (Q4_K: its 6-bit scales in a byte
        # each) and 1.000x (Q8_0); the int4 kernel's forms held 1.111x / 1.059x (1.176x before
        # Q8_0 took one kernel group of 64), docs/quantization.md.
        assert held / share <= 1.10


@pytest.mark.parametrize("family,qtype", [("llama", "Q4_K"), ("qwen2", "Q4_K"), ("llama-tied", "Q8_0")])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 3.0], [2.0, 1.0, 1.0, 3.0]], ids=lambda w: f"N{len(w)}")
def test_gguf_store_streamed_greedy_follows_transformers(gguf_model, gguf_greedy_reference, family, qtype, weights):
    """The quantized store with its default options, streamed under a budget on the widest
    device: the same greedy tokens as with every block resident, and transformers' first
    token, which the prompt rows compute in float32. Not the later ones: decode rows go through
    the int4 kernel, whose bfloat16 outputs flip near-ties of a random model, at a token that
    differed between a full suite run and this file alone (all 12 equal alone, the 8th apart in
    the suite, llama Q4_K N4; likely torch's thread count, which earlier tests set; the agreement
    test above has the rates). The stored forms in float32 match all of them (test_gguf.py)."""
    from tpi.engine import kv_cache_bytes, prepare_store
    from tpi.model.sampling import SamplingParams
    from tpi.weights.packing import packed_copy_bytes
    from tpi.weights.retention import block_costs

    path = gguf_model(family, qtype)
    prompt = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
    expected = gguf_greedy_reference(family, qtype, prompt, 16)[:12]
    store = prepare_store(str(path), weights, "gguf")
    rank = max(range(len(weights)), key=lambda r: weights[r])
    opts = RuntimeOptions(max_seq=64, window=1).for_source(str(path))
    assert opts.dtype == "gguf" and opts.torch_compute_dtype() == torch.float32
    sizes = block_costs(store, rank, torch.float32)
    assert all(packed_copy_bytes(store.files[f].tensors, torch.float32) > 0 for f in store.block_files(rank)), \
        "every block's quantized forms are made into the int4 kernel's form (a copy, counted)"
    budget = kv_cache_bytes(store, rank, opts) + max(sizes) + (sum(sizes) - max(sizes)) // 4
    runs = {}
    for name, o in (("streamed", replace(opts, memory_budget=budget)), ("resident", replace(opts, scheduler=False))):
        engine = build_inproc_engine(ModelSettings(str(path), weights), o)
        try:
            engine.generator.stop_ids = set()
            runs[name] = engine.generator.generate(prompt, SamplingParams(max_new_tokens=12)).tokens
            if name == "streamed":
                assert engine.cluster.runners[rank].blocks.plan.streamed
        finally:
            engine.close()
    assert runs["streamed"] == runs["resident"]
    same = next((i for i, (a, b) in enumerate(zip(runs["streamed"], expected)) if a != b), len(expected))
    print(f"{family} {qtype} N{len(weights)}: the first {same} of 12 greedy tokens equal transformers'")
    assert same >= 1, "the first token comes from the prompt rows, computed in float32"


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
