"""GGUF's group forms computed exactly in float32, held at their size in the file.

`ExactGroupWeight` holds a stored group form (tpi.weights.gguf_quant) transposed for the
numba kernels of tpi.weights.gguf_numba: the same integers and float16 scales, so a device
holds what the file holds for its share (plus Q4_K's 6-bit scales in a byte each). Rows of
input below EXACT_ROWS (decode, a speculative step's verification) go through `gemv`: one
float32 multiply-add per weight, no rounding beyond float32's. More rows (a prefill) multiply
the weight dequantized to float32 a few groups at a time. Either way the result is the
dequantized float32 model's up to the order of float32 sums (tests/engine/test_gguf_exact.py).

Without numba (it is a dependency, but a device may lack a wheel for its platform) GGUF
forms fall back to the int4 kernel's forms (tpi.weights.gguf_kernels), which round each
group's scale and each output to bfloat16.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from tpi.weights.gguf_quant import QK_K, GroupWeight
from tpi.weights.sources import cache_dir

HAS_NUMBA = importlib.util.find_spec("numba") is not None
EXACT_ROWS = 8   # input rows from which a float32 matmul of the dequantized weight is used (both forms)
DEQUANT_ELEMENTS = 1 << 20   # weights dequantized at once for those (4 MiB of float32)
_NONE8 = np.zeros((0, 0), np.uint8)
_WARM: set = set()   # argument types whose kernels this process has compiled or loaded


_MODULE: list = []   # tpi.weights.gguf_numba, once imported


def _kernels():
    """tpi.weights.gguf_numba, imported once numba knows where to keep what it compiles
    (NUMBA_CACHE_DIR; else $TPI_CACHE/numba when writable, so later processes load the
    kernels in ~0.1 s instead of compiling them for ~1 s each; else nowhere)."""
    if not _MODULE:
        if "NUMBA_CACHE_DIR" not in os.environ:
            where = cache_dir() / "numba"
            try:
                where.mkdir(parents=True, exist_ok=True)
                if os.access(where, os.W_OK):
                    os.environ["NUMBA_CACHE_DIR"] = str(where)
            except OSError:
                pass
        from tpi.weights import gguf_numba

        _MODULE.append(gguf_numba)
    return _MODULE[0]


def _bits16(t: torch.Tensor) -> np.ndarray:
    """float16 (N, C) -> its bits transposed, uint16 (C, N)."""
    return t.t().contiguous().view(torch.int16).numpy().view(np.uint16)


def _cols(t: torch.Tensor) -> np.ndarray:
    """(N, C) -> (C, N), contiguous, as numpy."""
    return t.t().contiguous().numpy()


class ExactGroupWeight:
    """A stored GGUF group form transposed for the numba kernels (see module docstring)."""

    __slots__ = ("q", "bits", "group", "d", "sc", "lo", "lo_d", "per_super", "first", "two_level",
                 "low_kind", "out_features", "width")

    def __init__(self, w: GroupWeight):
        k = _kernels()
        p = w.parts
        self.bits, self.group, self.width = w.bits, w.group, w.width
        self.out_features = p["gq"].shape[0]
        self.q = _cols(p["gq"])                                   # (K, N) int8 or (K / 2, N) uint8
        self.two_level = "gd" in p
        self.per_super = QK_K // w.group if self.two_level else 1
        self.first = int(p["gfirst"][0]) if self.two_level else 0
        if self.two_level:
            self.d, self.sc = _bits16(p["gd"]), _cols(p["gscale"])   # (S, N) uint16, (G, N) uint8 / int8
        else:
            self.d, self.sc = _bits16(p["gscale"]), _NONE8           # (G, N) uint16
        self.lo, self.lo_d, self.low_kind = _NONE8, np.zeros((0, 0), np.uint16), k.LOW_NONE
        if "gmin" in p and self.two_level:
            self.lo, self.lo_d, self.low_kind = _cols(p["gmin"]), _bits16(p["gdmin"]), k.LOW_TWO_LEVEL
        elif "gmin" in p:
            self.lo, self.low_kind = _bits16(p["gmin"]), k.LOW_FLAT
        elif self.bits == 4:
            self.low_kind = k.LOW_MINUS_8
        self._warm()

    def _warm(self) -> None:
        """Compile (or load from the cache) this weight's kernels now, as its block loads, not
        in the first request's time to first token: once per process and argument types."""
        key = (self.q.dtype, self.sc.dtype, self.lo.dtype)
        if key not in _WARM:
            _WARM.add(key)
            for rows in (1, EXACT_ROWS):
                self.linear(torch.zeros(rows, self.width))

    def tensors(self) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in (self.q, self.d, self.sc, self.lo, self.lo_d)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.d, self.sc, self.lo, self.lo_d))

    def _args(self) -> tuple:
        return (self.group, _kernels().half_table(), self.d, self.sc, self.lo, self.lo_d, self.per_super, self.first,
                self.two_level, self.low_kind)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        k = _kernels()
        if x.shape[-1] != self.width:
            raise ValueError(f"input width {x.shape[-1]} != quantized weight width {self.width}")
        x2 = x.reshape(-1, self.width).to(torch.float32).contiguous()                   # (M, in)
        rows = x2.shape[0]
        y = torch.empty(rows, self.out_features)                                          # (M, out) float32
        if rows < EXACT_ROWS:
            k.gemv(self.q, self.bits, x2.numpy(), *self._args(), y.numpy())
        else:
            y.zero_()
            groups = self.width // self.group
            step = max(1, DEQUANT_ELEMENTS // (self.group * self.out_features))           # groups at a time
            for g0 in range(0, groups, step):
                g1 = min(groups, g0 + step)
                w = torch.empty((g1 - g0) * self.group, self.out_features)                # (columns, out) float32
                k.dequantize(self.q, self.bits, g0, g1, *self._args(), w.numpy())
                y.addmm_(x2[:, g0 * self.group : g1 * self.group], w)
        y = y.view(*x.shape[:-1], self.out_features)
        y = y if x.dtype == torch.float32 else y.to(x.dtype)
        return y if bias is None else y + bias

    def __repr__(self) -> str:
        return f"ExactGroupWeight(int{self.bits}, out={self.out_features}, in={self.width}, group={self.group})"
