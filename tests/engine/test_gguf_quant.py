"""GGUF's quantized types in their store forms: bit-exact against the gguf package's own
dequantizers, sliceable on group boundaries, and computed without expanding the weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tpi.weights.gguf_quant import GROUP_TYPES, GroupWeight, from_gguf

BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
F16_FIELDS = {"Q4_K": [(0, 2), (2, 4)], "Q5_K": [(0, 2), (2, 4)], "Q6_K": [(208, 210)]}


def raw_blocks(type_name: str, rows: int, width: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF rows of `type_name`: quantized with gguf.quants where it can, else random
    bytes with sane float16 steps (every bit pattern of the integer parts is legal)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    if type_name not in F16_FIELDS:
        return quantize(rng.normal(size=(rows, width)).astype(np.float32), GGMLQuantizationType[type_name])
    per = BLOCK_BYTES[type_name]
    b = rng.integers(0, 256, size=(rows, width // 256, per), dtype=np.uint8)
    for lo, hi in F16_FIELDS[type_name]:
        b[..., lo:hi] = rng.uniform(0.001, 0.05, size=(rows, width // 256)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("type_name", GROUP_TYPES)
def test_group_form_is_bit_exact(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = raw_blocks(type_name, 6, 512)
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).astype(np.float32))  # (6, 512)
    form = from_gguf(raw, type_name, 512)
    assert torch.equal(form.dequantize(), want)
    # cut like tensor parallelism does: rows, then a column range on group boundaries
    G = form.group
    part = form[1:5][:, 3 * G : 13 * G]
    assert torch.equal(part.dequantize(), want[1:5, 3 * G : 13 * G])
    assert torch.equal(part[:, 2 * G : 5 * G].dequantize(), want[1:5, 5 * G : 8 * G])
    with pytest.raises(ValueError, match="not on its"):
        form[:, 5 : 5 + G]


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q6_K"])
def test_group_linear_equals_dequantized_matmul(type_name):
    raw = raw_blocks(type_name, 40, 512, seed=1)
    form = from_gguf(raw, type_name, 512)
    weight = GroupWeight({k: v.clone() for k, v in form.parts.items()})
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    # float32 sums in another order (int4: even and odd columns apart): rounding only
    torch.testing.assert_close(weight.linear(x), x @ form.dequantize().t(), rtol=1e-4, atol=1e-4)
    assert weight.nbytes == sum(t.nbytes for t in form.parts.values())
