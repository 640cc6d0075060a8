"""numba kernels that multiply by a GGUF group form exactly, in float32.

The weight is held transposed, input column by input column, as the file's integers:

  q      int8 (K, N)      w[n, k] = q[k, n] * scale[g, n] + low[g, n], g = k // group
         uint8 (K / 2, N) int4: byte j holds columns 2 j (low nibble) and 2 j + 1 (high)
  d      uint16 (S, N)    float16 bits: the scale (flat types, S = groups) or the
                          super-block's multiplier d (two-level, `per_super` groups each)
  sc     (G, N)           two-level: the group's 6/8-bit integer multiplier of d
  lo     uint16 (G, N) or uint8 (G, N) and lo_d uint16 (S, N): the minimum (see LOW_*)

`gemv` computes y (M, N) = x (M, K) @ W.T for a few rows: for each group, the partial sums
q . x over the group's columns (one float32 multiply-add per weight, N-wide vectors: the
layout is what lets LLVM vectorize across output rows), then scale * partial + low * sum(x
over the group). Every product and sum is float32: the file's weights exactly, as the
dequantized float32 model computes them up to the order of the sums. `dequantize` gives the
float32 weight of a range of input columns, for prefill rows (a float32 matmul).
float16 is not a numba type: its bits index `half_table()`, the 65536 float32 values.
"""
from __future__ import annotations

import os

import numpy as np
from numba import njit

LOW_NONE, LOW_FLAT, LOW_TWO_LEVEL, LOW_MINUS_8 = 0, 1, 2, 3   # w = s q; s q + min; s q - dmin m; s (q - 8)
_FLAGS = {"reassoc", "contract"}   # sums may be reordered (still float32); no other fast-math
_CACHE = "NUMBA_CACHE_DIR" in os.environ   # set where writable (tpi.weights.gguf_exact._kernels)
_HALF: list[np.ndarray] = []


def half_table() -> np.ndarray:
    """float32 (65536,): the value of every float16 bit pattern."""
    if not _HALF:
        _HALF.append(np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32))
    return _HALF[0]


@njit(fastmath=_FLAGS, nogil=True, cache=_CACHE)
def _group_scales(g, half, d, sc, lo, lo_d, per_super, first, two_level, low_kind, steps, s, m):
    """s, m (N,) float32: group g's scale and minimum per output row. Two-level: `steps`
    (3, N) float32 caches the super-block's d and dmin (row 2, [0]: which super-block)."""
    N = s.shape[0]
    if two_level:
        sup = (first + g) // per_super
        if steps[2, 0] != sup:
            for n in range(N):
                steps[0, n] = half[d[sup, n]]
                if low_kind == LOW_TWO_LEVEL:
                    steps[1, n] = half[lo_d[sup, n]]
            steps[2, 0] = sup
        for n in range(N):
            s[n] = steps[0, n] * np.float32(sc[g, n])
        if low_kind == LOW_TWO_LEVEL:
            for n in range(N):
                m[n] = -steps[1, n] * np.float32(lo[g, n])
        else:
            m[:] = 0
        return
    for n in range(N):
        s[n] = half[d[g, n]]
    if low_kind == LOW_FLAT:
        for n in range(N):
            m[n] = half[lo[g, n]]
    elif low_kind == LOW_MINUS_8:
        for n in range(N):
            m[n] = np.float32(-8.0) * s[n]
    else:
        m[:] = 0


@njit(fastmath=_FLAGS, nogil=True, cache=_CACHE)
def _steps(N):
    """The super-block cache of _group_scales, holding none yet."""
    steps = np.empty((3, N), np.float32)
    steps[2, 0] = -1
    return steps


@njit(fastmath=_FLAGS, nogil=True, cache=_CACHE)
def _partials_int8(q, x, g, group, p):
    """p (M, N) += q . x over group g's columns, eight columns per pass over p."""
    for k in range(g * group, (g + 1) * group, 8):
        for r in range(x.shape[0]):
            x0, x1, x2, x3 = x[r, k], x[r, k + 1], x[r, k + 2], x[r, k + 3]
            x4, x5, x6, x7 = x[r, k + 4], x[r, k + 5], x[r, k + 6], x[r, k + 7]
            for n in range(p.shape[1]):
                p[r, n] += (((np.float32(q[k, n]) * x0 + np.float32(q[k + 1, n]) * x1)
                             + (np.float32(q[k + 2, n]) * x2 + np.float32(q[k + 3, n]) * x3))
                            + ((np.float32(q[k + 4, n]) * x4 + np.float32(q[k + 5, n]) * x5)
                               + (np.float32(q[k + 6, n]) * x6 + np.float32(q[k + 7, n]) * x7)))


@njit(fastmath=_FLAGS, nogil=True, cache=_CACHE)
def _partials_int4(q, x, g, group, p):
    """The same for two nibbles per byte b = lo + 16 hi, four bytes per pass: lo x0 + hi x1
    is computed as (b & 15) (x0 - x1 / 16) + b (x1 / 16), which needs no shift (2.5x faster
    here; the same products up to one float32 rounding of x0 - x1 / 16)."""
    sixteenth = np.float32(0.0625)
    for j in range(g * group // 2, (g + 1) * group // 2, 4):
        for r in range(x.shape[0]):
            a1, c1 = x[r, 2 * j + 1] * sixteenth, x[r, 2 * j + 3] * sixteenth
            e1, f1 = x[r, 2 * j + 5] * sixteenth, x[r, 2 * j + 7] * sixteenth
            a0, c0 = x[r, 2 * j] - a1, x[r, 2 * j + 2] - c1
            e0, f0 = x[r, 2 * j + 4] - e1, x[r, 2 * j + 6] - f1
            for n in range(p.shape[1]):
                b, c, e, f = q[j, n], q[j + 1, n], q[j + 2, n], q[j + 3, n]
                p[r, n] += (((np.float32(b & 15) * a0 + np.float32(b) * a1)
                             + (np.float32(c & 15) * c0 + np.float32(c) * c1))
                            + ((np.float32(e & 15) * e0 + np.float32(e) * e1)
                               + (np.float32(f & 15) * f0 + np.float32(f) * f1)))


@njit(fastmath=_FLAGS, nogil=True, cache=_CACHE)
def gemv(q, bits, x, group, half, d, sc, lo, lo_d, per_super, first, two_level, low_kind, y):
    """y (M, N) = x (M, K) @ W.T."""
    N = q.shape[1]
    p = np.empty((x.shape[0], N), np.float32)
    s = np.empty(N, np.float32)
    m = np.empty(N, np.float32)
    steps = _steps(N)
    y[:] = 0
    for g in range(x.shape[1] // group):
        p[:] = 0
        if bits == 8:
            _partials_int8(q, x, g, group, p)
        else:
            _partials_int4(q, x, g, group, p)
        _group_scales(g, half, d, sc, lo, lo_d, per_super, first, two_level, low_kind, steps, s, m)
        for r in range(x.shape[0]):
            xg = np.float32(0)                   # the sum of x over the group, for the minimums
            for k in range(g * group, (g + 1) * group):
                xg += x[r, k]
            for n in range(N):
                y[r, n] += p[r, n] * s[n] + m[n] * xg


@njit(fastmath=_FLAGS, nogil=True, cache=_CACHE)
def dequantize(q, bits, g0, g1, group, half, d, sc, lo, lo_d, per_super, first, two_level, low_kind, out):
    """out ((g1 - g0) * group, N) float32: the weight's input columns of groups g0..g1."""
    N = q.shape[1]
    s = np.empty(N, np.float32)
    m = np.empty(N, np.float32)
    steps = _steps(N)
    for g in range(g0, g1):
        _group_scales(g, half, d, sc, lo, lo_d, per_super, first, two_level, low_kind, steps, s, m)
        for c in range(group):
            k = g * group + c
            row = out[k - g0 * group]
            if bits == 8:
                for n in range(N):
                    row[n] = np.float32(q[k, n]) * s[n] + m[n]
            else:
                shift = 4 * (k & 1)
                for n in range(N):
                    row[n] = np.float32((q[k >> 1, n] >> shift) & 15) * s[n] + m[n]
