"""Fused projections (tpi.weights.slicing.fuse_projections): q, k, v stacked into one qkv
matrix and gate, up into one gate_up compute exactly the bits the separate matrices do, in
every stored form: plain, int8 / int4 per-row quantization, and every GGUF group type, through
the kernels each runs with (GGUF forms: the int4 kernel's, float32 inputs of these 6 rows
through its split path, bfloat16 ones through the kernel as they are)."""
from __future__ import annotations

import pytest
import torch

from test_gguf_quant import raw_blocks
from tpi.model.layers import linear
from tpi.weights.gguf_kernels import group_kernel_form
from tpi.weights.gguf_quant import GROUP_TYPES, from_gguf, take_group_weights
from tpi.weights.quant import QuantizedWeight, kernel_form, quantize
from tpi.weights.slicing import fuse_projections

ROWS = {"q": 192, "k": 64, "v": 64}   # a shard's q, k, v rows (3 and 1 + 1 heads of 64)
WIDTH = 768                           # a multiple of GGUF's 256-column super-blocks


def separate_and_fused(block: dict, dtype: torch.dtype, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ [q; k; v].T + bias, once from the three weights and once from the fused block."""
    x = torch.randn(2, 3, WIDTH).to(dtype)
    fused = fuse_projections(block)
    assert not {"q", "k", "v", "q_bias"} & {n.partition(".")[0] for n in fused}
    apart = torch.cat([linear(x, weights(block, p), block[p + "_bias"].to(dtype)) for p in ROWS], dim=-1)
    return apart, linear(x, weights(fused, "qkv"), fused["qkv_bias"].to(dtype))


def biases() -> dict:
    return {p + "_bias": torch.randn(n) for p, n in ROWS.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_fused_equals_separate(dtype):
    torch.manual_seed(0)
    block = {**{p: torch.randn(n, WIDTH).to(dtype) for p, n in ROWS.items()}, **biases()}
    apart, fused = separate_and_fused(block, dtype, lambda b, p: b[p])
    assert torch.equal(apart, fused)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_fused_equals_separate(scheme, dtype):
    torch.manual_seed(1)
    block = biases()
    for p, n in ROWS.items():
        block.update({f"{p}.{k}": v for k, v in quantize(torch.randn(n, WIDTH), scheme).items()})

    def weight(b, p):
        parts = {k.partition(".")[2]: v for k, v in b.items() if k.startswith(p + ".")}
        return kernel_form(QuantizedWeight(parts["qweight"], parts["scale"], parts.get("min")), dtype)

    apart, fused = separate_and_fused(block, dtype, weight)
    assert torch.equal(apart, fused)


@pytest.mark.parametrize("type_name", GROUP_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_fused_equals_separate(type_name, dtype):
    torch.manual_seed(2)
    block = biases()
    for i, (p, n) in enumerate(ROWS.items()):
        block.update(from_gguf(raw_blocks(type_name, n, WIDTH, seed=i), type_name, WIDTH).named(p))

    def weight(b, p):
        forms, _ = take_group_weights(b)
        return group_kernel_form(forms[p], dtype)   # the int4 kernel's form (rows padded)

    apart, fused = separate_and_fused(block, dtype, weight)
    assert torch.equal(apart, fused)


def test_gguf_parts_of_different_types_stay_separate():
    block = biases()
    for i, (p, t) in enumerate((("q", "Q4_K"), ("k", "Q4_K"), ("v", "Q6_K"))):
        block.update(from_gguf(raw_blocks(t, ROWS[p], WIDTH, seed=i), t, WIDTH).named(p))
    fused = fuse_projections(block)
    assert set(fused) == set(block)   # nothing stacked, the biases neither (the runtime's separate path)


def test_a_group_missing_a_part_is_refused():
    with pytest.raises(ValueError, match="cannot fuse qkv"):
        fuse_projections({"q": torch.ones(2, 4), "k": torch.ones(1, 4)})
