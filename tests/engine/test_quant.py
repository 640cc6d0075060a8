"""Quantized shard stores: the int8 / int4 formats round-trip, `linear` computes with them,
the engine runs them (streamed or resident alike), and SmolLM2's greedy predictions stay
close to bfloat16's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from text_sample import DECLARATION
from tpi.settings import RuntimeOptions
from tpi.engine import build_inproc_engine, kv_cache_bytes, prepare_store
from tpi.settings import ModelSettings
from tpi.weights.retention import block_costs
from tpi.model.layers import linear
from tpi.model.sampling import SamplingParams
from tpi.weights.quant import (DenseWeight, Int4Weight, Int8Weight, QuantizedWeight, repack_int4, int4_kernel_bytes,
                               kernel_form, quantize, quantize_tensors, unpack_int4)
from tpi.weights.packing import pack_block, packed_copy_bytes


def qw(w, scheme):
    parts = quantize(w, scheme)
    return QuantizedWeight(parts["qweight"], parts["scale"], parts.get("min"))


@pytest.mark.parametrize("width", [64, 96, 67])   # 67: int4 pads the last group
def test_formats_round_trip_within_their_step(width):
    torch.manual_seed(0)
    w = torch.randn(24, width) * 0.05                                    # (out, in)
    q8 = qw(w, "int8")
    assert q8.qweight.dtype == torch.int8 and q8.scale.shape == (24,)
    step8 = w.abs().amax(1, keepdim=True) / 127
    assert ((q8.dequantize() - w).abs() <= step8 / 2 + 1e-6).all()
    q4 = qw(w, "int4")
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.shape == (24, (width + 31) // 32 * 16)
    assert q4.group == 32 and q4.minimum.shape == q4.scale.shape
    d4 = q4.dequantize(torch.float32, width)
    step4 = q4.scale.float().repeat_interleave(32, dim=1)[:, :width]
    assert ((d4 - w).abs() <= step4 / 2 + 1e-3 * step4 + 1e-6).all()


def test_int4_packing_is_lossless_on_its_grid():
    # values already on a 16-level grid per group (as a Q4_1 source is) come back exactly
    torch.manual_seed(1)
    q = torch.randint(0, 16, (8, 64)).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15                                                     # every group spans 0..15
    scale = (torch.rand(8, 2) + 0.01).half().float()
    lo = -torch.rand(8, 2).half().float()
    w = q * scale.repeat_interleave(32, 1) + lo.repeat_interleave(32, 1)
    assert torch.equal(qw(w, "int4").dequantize(), w)
    packed = qw(w, "int4").qweight
    assert torch.equal(unpack_int4(packed).float(), q)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(40, 80), (33, 67), (192, 576)])   # 33 x 67: rows and width off the kernels' blocks
def test_linear_kernels_match_the_dequantized_weight(scheme, shape):
    torch.manual_seed(2)
    out, width = shape
    w, b = torch.randn(out, width) * 0.05, torch.randn(out)
    x = torch.randn(2, 3, width)                                          # (B, T, in)
    q = qw(w, scheme)
    ref = F.linear(x, q.dequantize(torch.float32, width), b)
    torch.testing.assert_close(linear(x, q, b), ref, rtol=1e-5, atol=1e-5)          # on the fly
    k = kernel_form(q, torch.float32)                                     # float32: dequantized once
    assert isinstance(k, DenseWeight) and k.weight.dtype == torch.float32
    torch.testing.assert_close(linear(x, k, b), ref, rtol=1e-5, atol=1e-5)
    kern = Int8Weight(q.qweight, q.scale) if scheme == "int8" else repack_int4(q, torch.float32)
    torch.testing.assert_close(linear(x, kern, b), ref, rtol=1e-5, atol=1e-5)  # the float32 kernels agree too
    xb, kb = x.bfloat16(), kernel_form(q, torch.bfloat16)
    if scheme == "int8" and width % 8:
        assert kb is q        # torch's int8 kernel crashes on bfloat16 rows of such widths
    else:
        assert isinstance(kb, Int8Weight if scheme == "int8" else Int4Weight)
    y = linear(xb, kb, b.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, out)
    torch.testing.assert_close(y.float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_block_counts_what_it_copies(scheme, dtype):
    torch.manual_seed(3)
    stored = quantize_tensors({"gate": torch.randn(200, 96), "input_norm": torch.ones(96).bfloat16(),
                               "gate_bias": torch.randn(200).bfloat16()}, scheme)
    names = {"gate.qweight", "gate.scale", "input_norm", "gate_bias"} | ({"gate.min"} if scheme == "int4" else set())
    assert set(stored) == names
    block, copied = pack_block(stored, dtype)
    assert set(block) == {"gate", "input_norm", "gate_bias"}
    kind = DenseWeight if dtype == torch.float32 else Int8Weight if scheme == "int8" else Int4Weight
    assert isinstance(block["gate"], kind) and block["gate"].bits == int(scheme[3])
    assert block["input_norm"].dtype == dtype
    # the manifest-side estimate the scheduler budgets with is exact
    info = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in stored.items()}
    assert packed_copy_bytes(info, dtype) == copied
    floats = 0 if dtype == torch.bfloat16 else (96 + 200) * 4
    if dtype == torch.float32:   # the weight dequantized to float32
        assert copied == floats + 200 * 96 * 4
    elif scheme == "int8":   # the weight is used as stored; only a bfloat16 scale is a copy
        assert copied == floats + 200 * 2
    else:                  # repacked weight (rows padded to the kernel's block) + scales and zeros
        rows = block["gate"].packed.shape[0]
        assert rows % 16 == 0 and 200 <= rows < 264
        assert copied == floats + rows * 48 + 3 * rows * 2 * dtype.itemsize == floats + int4_kernel_bytes(200, 96, 32, dtype)


def test_int4_repack_is_the_kernels_own_layout():
    # the byte-level repack gives exactly what torch's conversion gives, rows padded included
    torch.manual_seed(4)
    q = qw(torch.randn(200, 96), "int4")
    fast = kernel_form(q, torch.bfloat16).packed                         # (rows, 48)
    rows = fast.shape[0]
    unpacked = torch.nn.functional.pad(unpack_int4(q.qweight).to(torch.int32), (0, 0, 0, rows - 200))
    assert torch.equal(fast, torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked, 2))


PROMPT = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_store_streams_like_it_is_resident(tiny_model, scheme):
    model = str(tiny_model("llama3"))
    store = prepare_store(model, [1.0, 2.0], scheme)
    assert store.dtype == scheme
    names = store.files["rank-1/layer-000.mlp.safetensors"].tensors
    assert names["gate_up.qweight"]["dtype"] == ("int8" if scheme == "int8" else "uint8")
    assert names["post_norm"]["dtype"] == "bfloat16"
    kept = names.get("down", {}).get("dtype")      # int8 leaves q, k, v, down in bfloat16
    assert kept == ("bfloat16" if scheme == "int8" else None)
    # bytes each file holds once loaded in the default compute dtype (bfloat16 for a quantized store)
    sizes = block_costs(store, 1, RuntimeOptions(dtype=scheme).torch_compute_dtype())
    budget = kv_cache_bytes(store, 1, RuntimeOptions(dtype=scheme, max_seq=64)) + max(sizes) + (sum(sizes) - max(sizes)) // 4
    runs = []
    for opts in (RuntimeOptions(dtype=scheme, max_seq=64, scheduler=False),
                 RuntimeOptions(dtype=scheme, max_seq=64, window=1, memory_budget=budget)):
        engine = build_inproc_engine(ModelSettings(model, [1.0, 2.0]), opts)
        try:
            engine.generator.stop_ids = set()
            runs.append(engine.generator.generate(PROMPT, SamplingParams(max_new_tokens=8)).tokens)
            if opts.scheduler:
                assert engine.cluster.runners[1].blocks.plan.streamed
        finally:
            engine.close()
    assert runs[0] == runs[1] and len(runs[0]) == 8


# --- accuracy on a real model ------------------------------------------------------------

def teacher_forced_argmax(dtype: str, devices: int) -> torch.Tensor:
    """Top-1 prediction at each of 257 positions of a real text, from one prefill."""
    engine = build_inproc_engine(ModelSettings(None, [1.0] * devices), RuntimeOptions(dtype=dtype, compute_dtype="float32", max_seq=272))
    try:
        ids = torch.tensor([engine.tokenizer.encode(DECLARATION)[:257]])  # (1, 257)
        with torch.no_grad():
            # the output head's candidates at every position (257 rows), merged over devices
            candidates = engine.cluster.forward(engine.embedder.embed(ids), [0], [0], every_position=True)
            return candidates.argmax()                                          # (257,)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def bf16_predictions(smollm2_dir):
    # the same plan (2 devices) as the quantized stores: only the weights differ
    return teacher_forced_argmax("bfloat16", 2)


# Targets (issue): int8 >= 97%, int4 >= 85%, over 256 teacher-forced positions, float32
# compute on both sides. SmolLM2 is sensitive: bfloat16 against float32 weights already
# flips 1.2% of the positions and bfloat16 against float32 compute 3.5% (a fifth of the
# positions have a top-2 logit margin under 0.3). Measured here: int8 97.3% (per output
# channel, with q, k, v, down kept bfloat16; all seven quantized: 93.0%), int4 98.4% (its
# grid matches SmolLM2's Q4_1 source). See docs/quantization.md.
AGREEMENT = {"int8": 0.97, "int4": 0.85}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_smollm2_top1_agreement_with_bfloat16(bf16_predictions, scheme):
    got = teacher_forced_argmax(scheme, 2)
    agreement = (got[1:] == bf16_predictions[1:]).float().mean().item()   # 256 positions
    print(f"{scheme}: top-1 agreement with bfloat16 over 256 positions: {agreement:.3f}")
    assert agreement >= AGREEMENT[scheme]
