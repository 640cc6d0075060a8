"""GGUF's group forms computed by torch's int4 CPU kernel: for bfloat16 compute, and for float32
compute where numba is missing (with numba, float32 compute is exact: tpi.weights.gguf_exact).

aten::_weight_int4pack_mm_for_cpu(x (M, K), packed, G, sz (K / G, N, 2)) computes x @ W.T with
W[n, k] = (nibble[n, k] - 8) * sz[k // G, n, 0] + sz[k // G, n, 1]: a scale and a zero per
group of G (32 or 64) input columns, both in x's dtype, each weight dequantized in float32 and
the products summed in float32 (tests/engine/test_gguf_kernels.py checks this against that
formula). Every GGUF type (tpi.weights.gguf_quant's forms, w = s * q + min per group) maps
onto it:

| GGUF | kernel weight (N, K') over input x' | G | scale, zero per kernel group | bits / weight held (file) |
| --- | --- | --- | --- | --- |
| Q4_0, Q4_1, Q4_K | the stored nibbles, K' = K, x' = x | 32 | s, min + 8 s (Q4_0: min = -8 s, zero 0) | 5 (4.5, 5, 4.5) |
| Q8_0, Q5_0, Q5_1, Q5_K | u = q + 128 (0..255) as [u >> 4 \\| u & 15] per group, K' = 2K, x' = [x_g \\| x_g / 16] per group | 64 | 16 s, 16 (min + 8 s) / 17 | 9 (8.5, 5.5, 6, 5.5) |
| Q6_K (groups of 16, q in -32..31) | u = q + 32 (0..63) as [(u & 3) + 8 \\| u >> 2] per group, K' = 2K, x' = [x_g \\| 4 x_g] per group | 32 | s, 0 | 10 (6.6) |

Why each is the weight. Q8_0's kind: one kernel group holds a GGUF group's high nibbles then
its low ones, the low ones over x / 16, so with S = 16 s and Z its zero the group computes
x ((hi - 8) S + Z) + x / 16 ((lo - 8) S + Z) = x (s (16 hi + lo - 136) + 17 Z / 16) =
x (s q + min) when 17 Z / 16 = min + 8 s: one scale and zero per 32 weights (9 bits), where a
kernel group each for the high and the low nibbles would hold two (10). Q6_K's: s ((u & 3) + 8
- 8) + 4 s ((u >> 2) - 8) = s (u - 32) = s q. Multiplying by 16, by 4 or by 1 / 16 is exact
in any binary float, so the kernel's weights are the file's exactly up to one rounding of the
scale and of the zero to the compute dtype: bfloat16 keeps 8 significant bits of GGUF's 11-bit
float16 steps (relative error at most 2^-9 per group, the same bound as a bfloat16 copy of the
weight has per weight).

The scales are bfloat16 in either compute dtype (the kernel wants them in its input's dtype,
and torch's float32 and float16 int4 paths are far slower than its bfloat16 one). float32
activations (a gguf store's default) keep their precision around the kernel: prefill rows
multiply the weight dequantized to float32, decode rows go through the kernel as two bfloat16
rows (`GGUFKernelWeight`). float16 compute keeps the stored forms (GroupWeight, exact,
dequantized in chunks). docs/quantization.md has the measurements behind each choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# EXACT_ROWS: rows at or above which a float32 input is multiplied by the weight dequantized
# to float32 (a prefill); below it (decode) by the kernel, the input split into two bfloat16 rows.
from tpi.weights.gguf_exact import EXACT_ROWS, HAS_NUMBA, ExactGroupWeight
from tpi.weights.gguf_quant import CHUNK_ELEMENTS, GroupWeight
from tpi.weights.quant import HAS_INT4_MM, Int4Weight, QuantizedWeight, int4_kernel_bytes, kernel_block_n, repack_int4

KERNEL_GROUP = 32
# Spread kinds: (columns of a file group, factor on its second copy of the input).
SPREADS = {"sixteenth": (32, 1 / 16), "times4": (16, 4)}


class GGUFKernelWeight(Int4Weight):
    """A GGUF form in the int4 kernel's layout, over the plain input x (spread None) or, per
    group of the file, over [x_g | x_g / 16] ("sixteenth", groups of 32) or [x_g | 4 x_g]
    ("times4", groups of 16); see the module docstring. bfloat16 inputs go through the kernel; float32 ones through
    `_exact` (M >= EXACT_ROWS) or `_split` (decode)."""

    __slots__ = ("spread",)

    def __init__(self, inner: Int4Weight, spread: str | None):
        super().__init__(inner.packed, inner.scales_zeros, inner.out_features, inner.group)
        self.spread = spread

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        if self.spread is None:
            return x
        width, factor = SPREADS[self.spread]
        xg = x.reshape(*x.shape[:-1], -1, width)                                      # (..., in / width, width)
        return torch.cat((xg, factor * xg), dim=-1).reshape(*x.shape[:-1], -1)        # (..., 2 in)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32:
            return super().linear(self._spread(x), bias)
        x2 = x.reshape(-1, x.shape[-1])                                               # (M, in)
        y = self._exact(x2) if x2.shape[0] >= EXACT_ROWS else self._split(x2)         # (M, out) float32
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _split(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, in) float32 = hi + lo, both bfloat16 (hi + lo keeps 16 of float32's 24
        significant bits), through one kernel call of 2M rows (weight-bound for small M:
        about the cost of M); each half's output is rounded to bfloat16, then summed in float32."""
        hi = x2.to(torch.bfloat16)
        lo = (x2 - hi.float()).to(torch.bfloat16)
        y = super().linear(self._spread(torch.cat((hi, lo))), None).float()           # (2M, out)
        m = x2.shape[0]
        return y[:m] + y[m:]

    def _exact(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, in) float32 @ W.T with W dequantized to float32, CHUNK_ELEMENTS at a time:
        the file's weights up to the scales' bfloat16 rounding, float32 products and sums.
        W = (q - 8) s + zero: q s is dequantized (in place), the (zero - 8 s) per group meet
        the sums of x over each group in one small matmul (as GroupWeight.linear does)."""
        xs = self._spread(x2)                                                         # (M, in'')
        width = 2 * self.packed.shape[1]
        xs = F.pad(xs, (0, width - xs.shape[1])) if xs.shape[1] < width else xs        # (M, in_pad'')
        sz = self.scales_zeros.float()                                                # (groups, out_pad, 2)
        sums = xs.view(xs.shape[0], -1, self.group).sum(-1)                           # (M, groups)
        y = sums @ (sz[..., 1] - 8 * sz[..., 0])                                      # (M, out_pad)
        block_n = kernel_block_n()
        blocks = self.packed.shape[0] // block_n
        step = max(1, CHUNK_ELEMENTS // (width * block_n))
        for b0 in range(0, blocks, step):
            b1 = min(blocks, b0 + step)
            part = torch.matmul(xs, self.transposed_blocks(b0, b1, sz[..., 0]))       # (2 nb, M, h)
            y[:, b0 * block_n : b1 * block_n] += part.transpose(0, 1).reshape(x2.shape[0], -1)
        return y[:, : self.out_features]

    def transposed_blocks(self, b0: int, b1: int, scale: torch.Tensor) -> torch.Tensor:
        """q s of kernel row blocks [b0, b1), float32, each half block transposed: (2 nb, in'',
        h), [2 b + s, k, i] for row (b0 + b) block_n + s h + i, kernel column k; `scale` is
        (groups, out_pad). It is the kernel layout's own order (no permuting copy): byte
        [b, j, t, i] holds column 2 j + t of row i (low nibble) and row i + h (high)."""
        h, half = kernel_block_n() // 2, self.packed.shape[1]
        native = self.packed.view(-1, half, 2, h)[b0:b1]                              # (nb, in/2, 2, h)
        q = torch.stack((native & 0x0F, native >> 4), dim=1).float()                  # (nb, 2, in/2, 2, h)
        halves, groups = 2 * (b1 - b0), scale.shape[0]
        s = scale[:, b0 * 2 * h : b1 * 2 * h].reshape(groups, halves, 1, h).transpose(0, 1)  # (2 nb, groups, 1, h)
        return q.view(halves, groups, self.group, h).mul_(s).view(halves, -1, h)

    def _fold(self, wide: torch.Tensor) -> torch.Tensor:
        """Kernel rows over the spread input -> rows over x: per file group, a + factor * c."""
        if self.spread is None:
            return wide
        width, factor = SPREADS[self.spread]
        parts = wide.view(wide.shape[0], -1, 2, width)                                # (n, in / width, 2, width)
        return (parts[:, :, 0] + factor * parts[:, :, 1]).reshape(wide.shape[0], -1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Rows `ids` of the weight over the plain input x, float32 (n, in)."""
        wide = super().rows(ids)                                                      # (n, in'')
        return None if wide is None else self._fold(wide)

    def __repr__(self) -> str:
        return f"GGUFKernelWeight({self.spread}, out={self.out_features}, in={self.packed.shape[1]})"


def kernel_fits(dtype: torch.dtype, exact: bool = False) -> bool:
    """Whether GGUF forms compute through the int4 kernel's form in compute dtype `dtype`:
    bfloat16, and float32 through GGUFKernelWeight's paths (torch 2.13's own float16 and
    float32 paths of this kernel took 50-250x the bfloat16 time on a (16384, 576) weight
    here, `bench/gguf_linear.py`); float16, and float32 when `exact`, compute the stored forms."""
    kinds = (torch.bfloat16,) if exact else (torch.bfloat16, torch.float32)
    return HAS_INT4_MM and dtype in kinds and kernel_block_n() is not None


def gguf_form(dtype: torch.dtype, exact: bool = False) -> str:
    """Which form a stored GGUF matrix is multiplied in for compute dtype `dtype` (`exact`:
    RuntimeOptions.gguf_exact): "exact", float32 with numba (tpi.weights.gguf_exact, the
    stored form transposed, a copy of the same bytes); "kernel", the int4 kernel's form
    (bfloat16, or float32 without numba; scales in bfloat16, a new copy); "stored", the form
    itself (float16, or float32 without numba when `exact`). The one place this is decided:
    group_kernel_form, group_kernel_bytes and the planner's estimate ask here."""
    if dtype == torch.float32 and HAS_NUMBA:
        return "exact"
    return "kernel" if kernel_fits(dtype, exact) else "stored"


def group_kernel_form(w: GroupWeight, dtype: torch.dtype, exact: bool = False
                      ) -> GroupWeight | Int4Weight | ExactGroupWeight:
    """What `linear` multiplies with for a stored GGUF form (see `gguf_form`); the stored
    tensors can go once it is made."""
    form = gguf_form(dtype, exact)
    if form == "exact":
        return ExactGroupWeight(w)
    if form == "stored":
        return w
    out = w.parts["gq"].shape[0]
    scale, low = (t.squeeze(-1) if t is not None else None for t in w.scales(0, out))   # (out, groups) float32
    q = w.parts["gq"]                                  # (out, in / 2) uint8 nibbles or (out, in) int8
    if w.bits == 4:
        return GGUFKernelWeight(repack_int4(QuantizedWeight(q, scale, low), torch.bfloat16), None)
    if w.group == KERNEL_GROUP:
        u = (q.view(torch.uint8) ^ 0x80).view(out, -1, KERNEL_GROUP)                    # q + 128, (out, groups, 32)
        nibbles = torch.cat((u >> 4, u & 0x0F), dim=2).view(out, -1)                    # (out, 2 in)
        zeros = (8 * scale if low is None else low + 8 * scale) * (16 / 17)             # (out, groups)
        kernel = _repacked(nibbles, 16 * scale, zeros - 128 * scale)
        kernel.scales_zeros[:, :out, 1] = zeros.t()     # as computed, not through zeros - 8 S + 8 S
        return GGUFKernelWeight(kernel, "sixteenth")
    if w.group == 16 and low is None:
        u = (q + 32).view(torch.uint8).view(out, -1, 16)                                # (out, groups, 16) 0..63
        nibbles = torch.cat(((u & 3) + 8, u >> 2), dim=2).view(out, -1)                 # (out, 2 in)
        return GGUFKernelWeight(_repacked(nibbles, scale, -8 * scale), "times4")        # zero = low + 8 s = 0
    return w


def _repacked(nibbles: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor) -> Int4Weight:
    """Nibbles (out, K') 0..15 with a scale and a low per kernel group -> the kernel's form."""
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()                 # (out, K' / 2) uint8
    return repack_int4(QuantizedWeight(packed, scales, lows), torch.bfloat16)


def group_kernel_bytes(gq_shape: tuple[int, int], groups: int, stored: int, dtype: torch.dtype,
                       exact: bool = False) -> int:
    """Bytes `group_kernel_form` allocates for a stored form whose `gq` has this shape, whose
    `gscale` has `groups` columns and whose parts take `stored` bytes (a manifest's; int4 or
    int8, either way 2 * its columns nibbles per row), 0 when the form is used as stored."""
    form = gguf_form(dtype, exact)
    if form != "kernel":
        return stored if form == "exact" else 0    # exact: the same parts, transposed
    out, cols = gq_shape
    width = 2 * cols                        # int4: two nibbles per byte; int8: hi and lo nibbles
    # int8 of groups of 32 (Q8_0's kind): one kernel group of 64 per file group
    group = 2 * KERNEL_GROUP if width == 2 * KERNEL_GROUP * groups else KERNEL_GROUP
    return int4_kernel_bytes(out, width, group, torch.bfloat16)
