"""GGUF's group forms through torch's int4 CPU kernel (tpi.weights.gguf_kernels): the kernel
dequantizes as the module says, and every GGUF type's kernel form computes the file's weights
exactly up to one rounding of its scale (and zero) to the compute dtype."""
from __future__ import annotations

import pytest
import torch

from test_gguf_quant import raw_blocks
from tpi.weights.gguf_exact import ExactGroupWeight
from tpi.weights.gguf_kernels import EXACT_ROWS, group_kernel_bytes, group_kernel_form
from tpi.weights.gguf_quant import GROUP_TYPES, GroupWeight, from_gguf
from tpi.weights.quant import QuantizedWeight, repack_int4, unpack_int4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_kernel_dequantizes_as_nibble_minus_8_times_scale_plus_zero(dtype):
    """The formula every mapping rests on: W = (nibble - 8) * scale + zero, the scale and
    zero as given in the compute dtype, the sums in float32 (only the output is rounded)."""
    g = torch.Generator().manual_seed(0)
    out, width = 96, 256
    nib = torch.randint(0, 16, (out, width), generator=g, dtype=torch.uint8)                # (out, in)
    scale = (torch.rand(out, width // 32, generator=g) * 0.02 + 1e-3).to(dtype)             # (out, groups)
    zero = (torch.randn(out, width // 32, generator=g) * 0.02).to(dtype)                    # (out, groups)
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)                                             # (out, in / 2)
    # repack_int4 takes (scale, min) with zero = min + 8 * scale
    weight = repack_int4(QuantizedWeight(packed, scale.float(), zero.float() - 8 * scale.float()), dtype)
    assert torch.equal(weight.scales_zeros[..., 1][:, :out].t(), zero)                     # zeros as given
    w = ((nib.double().view(out, -1, 32) - 8) * scale.double()[..., None] + zero.double()[..., None]).view(out, width)
    x = torch.randn(5, width, generator=g).to(dtype)                                        # (5, in)
    want = x.double() @ w.t()                                                               # (5, out)
    got = weight.linear(x).double()
    # the only rounding beyond float32 sums is the output's to `dtype`
    eps = torch.finfo(dtype).eps
    assert ((got - want).abs() <= eps * want.abs() + 1e-4).all()


def shapes(form: GroupWeight) -> tuple[tuple[int, int], int, int]:
    """What group_kernel_bytes reads from a manifest: gq's shape, gscale's columns, the
    parts' bytes."""
    return tuple(form.parts["gq"].shape), form.parts["gscale"].shape[1], form.nbytes


def rounded_reference(form: GroupWeight, dtype: torch.dtype) -> torch.Tensor:
    """The file's weights with each group's scale, and its zero (min + 8 * scale), rounded once
    to `dtype`: W = s' * q + (min + 8 s)' - 8 s', float64 (out, in). Int8 forms of groups of
    32 (Q8_0's kind) hold S = 16 s and Z = 16 (min + 8 s) / 17 instead (gguf_kernels):
    W = S' / 16 * (q - 8) + 17 Z' / 16."""
    out = form.parts["gq"].shape[0]
    scale, low = form.scales(0, out)                                                        # (out, groups, 1)
    low = torch.zeros_like(scale) if low is None else low
    if form.bits == 4:
        q = unpack_int4(form.parts["gq"])                                                   # (out, in) 0..15
    else:
        q = form.parts["gq"]                                                                # (out, in) int8
    if form.bits == 8 and form.group == 32:
        big_s = (16 * scale).to(dtype).double()
        big_z = ((low + 8 * scale) * (16 / 17)).to(dtype).double()
        return (big_s / 16 * (q.double().view(out, -1, 32) - 8) + 17 * big_z / 16).view(out, -1)
    s = scale.to(dtype).double()
    zero = (low + 8 * scale).to(dtype).double()
    return (q.double().view(out, -1, form.group) * s + zero - 8 * s).view(out, -1)


@pytest.mark.parametrize("type_name", GROUP_TYPES)
def test_every_gguf_type_computes_its_weights_through_the_kernel(type_name):
    dtype = torch.bfloat16
    raw = raw_blocks(type_name, 128, 512, seed=2)   # 128 rows: whole row blocks of the kernel
    form = GroupWeight(dict(from_gguf(raw, type_name, 512).parts))
    weight = group_kernel_form(form, dtype)
    assert not isinstance(weight, GroupWeight), f"{type_name} has no kernel form"
    assert weight.nbytes == group_kernel_bytes(*shapes(form), dtype)
    bits = 8 * weight.nbytes / (128 * 512)
    assert bits <= {None: 5.5, "sixteenth": 9.5, "times4": 10.5}[weight.spread], bits
    w = rounded_reference(form, dtype)                                                      # (128, 512)
    exact = form.dequantize_rows(0, 128, torch.float32).double()
    # the rounded scales are the only change to the weights: at most 2^-8 of a group's scale step
    assert (w - exact).abs().max() <= torch.finfo(dtype).eps * exact.abs().max()
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 512), (7, 512), (2, 3, 512)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        want = x.double() @ w.t()                                                           # (..., 128)
        got = weight.linear(x).double()
        assert got.shape == want.shape
        scale = (x.double().abs() @ w.abs().t())                                            # the sums' magnitude
        assert ((got - want).abs() <= torch.finfo(dtype).eps * want.abs() + 1e-5 * scale).all(), type_name


@pytest.mark.parametrize("exact", [False, True])
def test_float16_keeps_the_stored_form_and_float32_its_exact_transpose(exact):
    form = GroupWeight(dict(from_gguf(raw_blocks("Q8_0", 8, 64), "Q8_0", 64).parts))
    assert group_kernel_form(form, torch.float16, exact) is form
    assert group_kernel_bytes(*shapes(form), torch.float16, exact) == 0
    weight = group_kernel_form(form, torch.float32, exact)                                  # numba is a dependency
    assert isinstance(weight, ExactGroupWeight)
    assert weight.nbytes == form.nbytes == group_kernel_bytes(*shapes(form), torch.float32, exact)  # Q8_0: no gfirst


@pytest.mark.parametrize("type_name", GROUP_TYPES)
def test_float32_inputs_lose_no_input_precision(type_name):
    """The kernel form with float32 inputs (what float32 compute holds where numba is
    missing; bfloat16 scales). Prefill rows (M >= EXACT_ROWS) multiply the dequantized
    float32 weight: float32 sums of the rounded-scale weights. Decode rows split x into two
    bfloat16 rows: only the output's bfloat16 rounding is left (the bfloat16 path also rounds
    the input: an error up to 2^-9 of the sums)."""
    raw = raw_blocks(type_name, 96, 512, seed=4)   # 96 rows: not a whole number of some row blocks
    form = GroupWeight(dict(from_gguf(raw, type_name, 512).parts))
    weight = group_kernel_form(form, torch.bfloat16)
    assert weight.nbytes == group_kernel_bytes(*shapes(form), torch.bfloat16)
    w = rounded_reference(form, torch.bfloat16)                                             # (96, 512)
    g = torch.Generator().manual_seed(5)
    for rows in (1, 3, EXACT_ROWS, 40):
        x = torch.randn(rows, 512, generator=g)                                             # (rows, in) float32
        want = x.double() @ w.t()                                                           # (rows, 96)
        got = weight.linear(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        scale = x.double().abs() @ w.abs().t()
        err = (got.double() - want).abs()
        if rows >= EXACT_ROWS:
            assert (err <= 1e-5 * scale).all(), (type_name, rows)
        else:
            assert (err <= torch.finfo(torch.bfloat16).eps / 2 * want.abs() + 2e-5 * scale).all(), (type_name, rows)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_rows_unpack_the_kernel_layout(type_name):
    """What the output head rescores its candidates with: chosen rows of the kernel's weight,
    float32, equal to the weight the kernel computes with."""
    form = GroupWeight(dict(from_gguf(raw_blocks(type_name, 128, 512, seed=3), type_name, 512).parts))
    weight = group_kernel_form(form, torch.bfloat16)
    ids = torch.tensor([0, 5, 31, 32, 33, 63, 64, 100, 127])
    assert torch.equal(weight.rows(ids).double(), rounded_reference(form, torch.bfloat16)[ids])
