"""GGUF's group forms computed by torch's int4 CPU kernel (bfloat16 compute).

aten::_weight_int4pack_mm_for_cpu(x (M, K), packed, 32, sz (K / 32, N, 2)) computes x @ W.T
with W[n, k] = (nibble[n, k] - 8) * sz[k // 32, n, 0] + sz[k // 32, n, 1]: a scale and a zero
per group of 32 input columns, both in x's dtype, each weight dequantized in float32 and the
products summed in float32 (tests/engine/test_gguf_kernels.py checks this against that formula).
Every GGUF type (tpi.weights.gguf_quant's forms, w = s * q + min per group) maps onto it:

| GGUF | kernel weight (N, K') over input x' | scale, zero per kernel group | bits / weight held |
| --- | --- | --- | --- |
| Q4_0, Q4_1, Q4_K (groups of 32) | the stored nibbles, K' = K, x' = x | s, min + 8 s (Q4_0: min = -8 s, zero 0) | 5 |
| Q8_0, Q5_0, Q5_1, Q5_K (groups of 32) | u = q + 128 (0..255) as [u >> 4 \\| u & 15], K' = 2K, x' = [x \\| x] | hi: 16 s, 0; lo: s, min + 8 s | 10 |
| Q6_K (groups of 16, q in -32..31) | u = q + 32 (0..63) as [(u & 3) + 8 \\| u >> 2] per group, K' = 2K, x' = [x_g \\| 4 x_g] per group | s, 0 | 10 |

Why each is the weight: 16 s (hi - 8) + s (lo - 8) + min + 8 s = s (16 hi + lo - 128) + min
= s q + min; and s ((u & 3) + 8 - 8) + 4 s ((u >> 2) - 8) = s (u - 32) = s q. Multiplying by
16, by 8 or by 4 is exact in any binary float, so the kernel's weights are the file's exactly
up to one rounding of the scale (and of min + 8 s, for the types with a min) to the compute
dtype: bfloat16 keeps 8 significant bits of GGUF's 11-bit float16 steps (relative error at
most 2^-9 per group, the same bound as a bfloat16 copy of the weight has per weight).

float32 and float16 compute keep the stored forms (GroupWeight, exact, dequantized in chunks):
torch's float32 and float16 int4 paths are far slower than its bfloat16 one.
"""
from __future__ import annotations

import torch

from tpi.weights.gguf_quant import GroupWeight
from tpi.weights.quant import Int4Weight, QuantizedWeight, HAS_INT4_MM, int4_kernel_bytes, repack_int4

KERNEL_GROUP = 32


class SpreadInt4Weight(Int4Weight):
    """An Int4Weight over a spread input: [x | x] ("twice") or, per group of 16 columns,
    [x_g | 4 x_g] ("times4"); see the module docstring."""

    __slots__ = ("spread",)

    def __init__(self, inner: Int4Weight, spread: str):
        super().__init__(inner.packed, inner.scales_zeros, inner.out_features, inner.group)
        self.spread = spread

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.spread == "twice":
            wide = torch.cat((x, x), dim=-1)                                          # (..., 2 in)
        else:
            x16 = x.reshape(*x.shape[:-1], -1, 16)                                    # (..., in / 16, 16)
            wide = torch.cat((x16, 4 * x16), dim=-1).reshape(*x.shape[:-1], -1)       # (..., 2 in)
        return super().linear(wide, bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Rows `ids` of the weight over the plain input x, float32 (n, in): the spread parts
        folded back (hi + lo; a + 4 c)."""
        wide = super().rows(ids)                                                      # (n, 2 in)
        if wide is None:
            return None
        if self.spread == "twice":
            hi, lo = wide.chunk(2, dim=1)
            return hi + lo
        parts = wide.view(len(ids), -1, 2, 16)                                        # (n, in / 16, 2, 16)
        return (parts[:, :, 0] + 4 * parts[:, :, 1]).reshape(len(ids), -1)

    def __repr__(self) -> str:
        return f"SpreadInt4Weight({self.spread}, out={self.out_features}, in={self.packed.shape[1]})"


def kernel_fits(dtype: torch.dtype) -> bool:
    """Whether GGUF forms compute through the int4 kernel in compute dtype `dtype`: bfloat16
    only (torch 2.13's float16 and float32 paths of this kernel took 50-250x the bfloat16
    time on a (16384, 576) weight here, `bench/gguf_linear.py`)."""
    return HAS_INT4_MM and dtype == torch.bfloat16


def group_kernel_form(w: GroupWeight, dtype: torch.dtype) -> GroupWeight | Int4Weight:
    """What `linear` multiplies with for a stored GGUF form in compute dtype `dtype`: the int4
    kernel's form (a new copy; the stored tensors can go) or, in float32, the form itself."""
    if not kernel_fits(dtype):
        return w
    out = w.parts["gq"].shape[0]
    scale, low = (t.squeeze(-1) if t is not None else None for t in w.scales(0, out))   # (out, groups) float32
    if w.bits == 4:
        return repack_int4(QuantizedWeight(w.parts["gq"], scale, low), dtype)
    q = w.parts["gq"]                                                                   # (out, in) int8
    if w.group == KERNEL_GROUP:
        u = q.view(torch.uint8) ^ 0x80                                                  # q + 128, (out, in)
        nibbles = torch.cat((u >> 4, u & 0x0F), dim=1)                                  # (out, 2 in)
        scales = torch.cat((16 * scale, scale), dim=1)                                  # (out, 2 groups)
        lows = torch.cat((-128 * scale, torch.zeros_like(scale) if low is None else low), dim=1)
        spread = "twice"
    elif w.group == 16 and low is None:
        u = (q + 32).view(torch.uint8).view(out, -1, 16)                                # (out, groups, 16) 0..63
        nibbles = torch.cat(((u & 3) + 8, u >> 2), dim=2).view(out, -1)                 # (out, 2 in)
        scales, lows = scale, -8 * scale                                                # zero = low + 8 s = 0
        spread = "times4"
    else:
        return w
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()                 # (out, in) uint8
    return SpreadInt4Weight(repack_int4(QuantizedWeight(packed, scales, lows), dtype), spread)


def group_kernel_bytes(gq_shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes `group_kernel_form` allocates for a stored form whose `gq` has this shape (a
    manifest's; int4 or int8, either way 2 * its columns nibbles per row), 0 when the form is
    used as stored."""
    if not kernel_fits(dtype):
        return 0
    out, cols = gq_shape
    width = 2 * cols                        # int4: two nibbles per byte; int8: hi and lo nibbles
    return int4_kernel_bytes(out, width, KERNEL_GROUP, dtype)
