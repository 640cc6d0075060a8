"""GGUF forms through the numba kernels (tpi.weights.gguf_exact): the file's weights exactly,
float32 sums, for decode rows (gemv) and prefill rows (dequantized float32 matmul), held at
the stored form's size. A bfloat16 rounding anywhere (2^-9) would miss the 1e-6 bound by far."""
from __future__ import annotations

import pytest
import torch

from test_gguf_quant import raw_blocks
from tpi.weights.gguf_exact import EXACT_ROWS, ExactGroupWeight
from tpi.weights.gguf_quant import GROUP_TYPES, GroupWeight, from_gguf


def check(weight: ExactGroupWeight, w: torch.Tensor, shapes) -> None:
    """weight.linear(x) against x @ w.T in float64 for inputs of the given shapes."""
    g = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(*shape, generator=g)                                                  # (..., in)
        want = x.double() @ w.t()                                                             # (..., out)
        got = weight.linear(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        scale = x.double().abs() @ w.abs().t()                                                # the sums' magnitude
        assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-9).all(), shape


@pytest.mark.parametrize("type_name", GROUP_TYPES)
def test_every_gguf_type_computes_the_files_weights_in_float32(type_name):
    raw = raw_blocks(type_name, 83, 512, seed=6)   # 83 rows: no kernel row block, odd N
    form = GroupWeight(dict(from_gguf(raw, type_name, 512).parts))
    weight = ExactGroupWeight(form)
    held = sum(t.nbytes for name, t in form.parts.items() if name != "gfirst")               # an int, kept as one
    assert weight.nbytes == held                                                              # held as stored
    w = form.dequantize_rows(0, 83, torch.float32).double()                                   # (83, 512)
    rows = (1, 2, EXACT_ROWS - 1, EXACT_ROWS, 40)
    check(weight, w, [(r, 512) for r in rows] + [(2, 3, 512)])


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_a_column_slice_starting_inside_a_super_block(type_name):
    """Tensor parallelism cuts input columns on group boundaries, not super-block ones: the
    slice's first group sits mid super-block (gfirst), and its d / dmin are shared."""
    full = from_gguf(raw_blocks(type_name, 64, 1024, seed=7), type_name, 1024)
    part = full[:, 288:736]                                                                   # groups 9.. / 18..
    assert int(part.parts["gfirst"][0]) != 0
    form = GroupWeight(dict(part.parts))
    w = full.dequantize()[:, 288:736].double()                                                # (64, 448)
    check(ExactGroupWeight(form), w, [(1, 448), (5, 448), (12, 448)])


def test_a_wrong_input_width_is_refused():
    form = GroupWeight(dict(from_gguf(raw_blocks("Q8_0", 8, 64), "Q8_0", 64).parts))
    with pytest.raises(ValueError, match="input width 32"):
        ExactGroupWeight(form).linear(torch.randn(1, 32))


def test_bfloat16_inputs_get_bfloat16_outputs():
    """A bfloat16 caller (a mixed block) gets its dtype back, computed in float32."""
    form = GroupWeight(dict(from_gguf(raw_blocks("Q4_1", 8, 64), "Q4_1", 64).parts))
    x = torch.randn(3, 64).to(torch.bfloat16)
    got = ExactGroupWeight(form).linear(x)
    want = (x.double() @ form.dequantize_rows(0, 8, torch.float32).double().t()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
