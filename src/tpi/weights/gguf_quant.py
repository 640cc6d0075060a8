"""GGUF's quantized tensors kept small: their store form, and the weight that computes with it.

A GGUF weight (rows of quantization blocks along the input dimension) becomes a group form:
integers per weight plus a scale (and a minimum) per group of G input columns:

  x.gq      int8 (out, in)             w = q * scale [+ min]
            uint8 (out, in / 2)        int4, two per byte (low nibble: even column), as the
                                       int4 stores of tpi.weights.quant; w = q * scale + min,
                                       or (q - 8) * scale when there is no min (Q4_0)
  x.gscale  (out, in / G)              float16: the scale itself; or, two-level (K-quants),
                                       a 6/8-bit integer multiplier of x.gd
  x.gmin    (out, in / G)              optional, the same way (two-level: of x.gdmin, negated)
  x.gd, x.gdmin  float16 (out, ceil)   two-level only: per 256-column super-block
  x.gfirst  int64 (1,)                 two-level only: the group of the first column within
                                       its super-block (0 unless a slice starts mid-block)

| GGUF | form | exact? | bits / weight (file) |
| --- | --- | --- | --- |
| Q8_0 | int8, G 32, scale float16 | exact | 8.5 (8.5) |
| Q4_0 | int4, G 32, scale float16, w = (q - 8) * scale | exact | 4.5 (4.5) |
| Q4_1 | int4, G 32, scale and min float16 | exact | 5 (5) |
| Q4_K | int4, G 32, two-level 6-bit scale and min | exact | 4.6 (4.5) |
| Q5_0 | int8 (q - 16), G 32, scale float16 | exact | 8.5 (5.5) |
| Q5_1 | int8, G 32, scale and min float16 | exact | 9 (6) |
| Q5_K | int8, G 32, two-level 6-bit scale and min | exact | 8.6 (5.5) |
| Q6_K | int8 (q - 32), G 16, two-level int8 scale | exact | 8.6 (6.6) |

Every form reproduces the GGUF dequantization bit for bit in float32 (the products of a
float16 step and a small integer are exact in float32); 5- and 6-bit values are held in a
byte (torch has no 5/6-bit kernels), so those types are about 1.5x their file size.

`GroupWeight.linear` dequantizes the weight in chunks of rows, each into the activation's
dtype, and multiplies: the weight stays in its stored form in memory (the chunk is
transient, at most 4 MiB in float32), in any compute dtype.

Slicing (tensor parallelism, pieces): `GGUFQuantized` is indexed like the (out, in) tensor it
stands for, `w[a:b]` (rows) and `w[:, a:b]` (columns). Column cuts must fall on group
boundaries (multiples of G: 32, or 16 for Q6_K), which head and MLP-column boundaries are
(head dims and the plan's 64-column MLP alignment); a cut elsewhere is refused.
"""
from __future__ import annotations

import numpy as np
import torch

SUFFIXES = ("gq", "gscale", "gmin", "gd", "gdmin", "gfirst")
QK_K = 256
CHUNK_ELEMENTS = 1 << 20  # weights dequantized at once by GroupWeight.linear (4 MiB float32)


class GGUFQuantized:
    """A quantized (out, in) weight as its store parts, sliceable like the weight."""

    def __init__(self, parts: dict[str, torch.Tensor], width: int):
        self.parts, self.width = parts, width
        self.bits = 4 if parts["gq"].dtype == torch.uint8 else 8
        self.group = width // parts["gscale"].shape[1]
        self.shape = (parts["gq"].shape[0], width)

    def __getitem__(self, key) -> "GGUFQuantized":
        if isinstance(key, slice):
            return GGUFQuantized({k: v if k == "gfirst" else v[key] for k, v in self.parts.items()}, self.width)
        rows, cols = key
        if rows != slice(None) or cols.step not in (None, 1):
            raise IndexError(f"a quantized weight is sliced by rows or by a column range, not {key!r}")
        a, b, _ = cols.indices(self.width)
        G = self.group
        if a % G or (b % G and b != self.width):
            raise ValueError(f"cannot cut a quantized weight at columns {a}..{b}: not on its {G}-column groups")
        per_byte = 2 if self.bits == 4 else 1
        p = {"gq": self.parts["gq"][:, a // per_byte : b // per_byte]}
        for k in ("gscale", "gmin"):
            if k in self.parts:
                p[k] = self.parts[k][:, a // G : b // G]
        if "gd" in self.parts:  # two-level: keep the super-blocks the range touches
            per_super = QK_K // G
            first = int(self.parts["gfirst"][0]) + a // G
            last = int(self.parts["gfirst"][0]) + b // G - 1
            for k in ("gd", "gdmin"):
                if k in self.parts:
                    p[k] = self.parts[k][:, first // per_super : last // per_super + 1]
            p["gfirst"] = torch.tensor([first % per_super])
        return GGUFQuantized(p, b - a)

    def named(self, base: str) -> dict[str, torch.Tensor]:
        """The parts as block-file tensors `base.gq`, ... (contiguous copies)."""
        return {f"{base}.{k}": v.contiguous().clone() for k, v in self.parts.items()}

    def dequantize(self) -> torch.Tensor:
        return GroupWeight(self.parts).dequantize_rows(0, self.shape[0], torch.float32)


class GroupWeight:
    """A stored group form (see the module docstring), computed by chunked dequantization."""

    __slots__ = ("parts", "bits", "group", "width", "_super")

    def __init__(self, parts: dict[str, torch.Tensor]):
        self.parts = parts
        q = parts["gq"]
        self.bits = 4 if q.dtype == torch.uint8 else 8
        self.width = q.shape[1] * (2 if self.bits == 4 else 1)
        self.group = self.width // parts["gscale"].shape[1]
        self._super = None
        if "gd" in parts:  # super-block of each group
            per_super = QK_K // self.group
            self._super = (int(parts["gfirst"][0]) + torch.arange(parts["gscale"].shape[1])) // per_super

    def tensors(self) -> list[torch.Tensor]:
        return list(self.parts.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def scales(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-group scale and minimum of rows [a, b), float32 (rows, groups, 1) each."""
        p = self.parts
        scale = p["gscale"][a:b].float()                                                 # (rows, groups)
        low = p["gmin"][a:b].float() if "gmin" in p else None
        if self._super is not None:
            scale = scale * p["gd"][a:b].float()[:, self._super]
            if low is not None:
                low = -low * p["gdmin"][a:b].float()[:, self._super]
        if self.bits == 4 and low is None:
            low = -8 * scale
        return scale[:, :, None], None if low is None else low[:, :, None]

    def _columns(self, a: int, b: int, dtype: torch.dtype, with_low: bool = True
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Rows [a, b) dequantized: int8, [(rows, in)]; int4, [even columns, odd columns],
        each (rows, in / 2) (the nibbles as stored, so no interleaving copy). Without
        `with_low` the per-group minimum is left out and returned, (rows, groups, 1)."""
        q = self.parts["gq"][a:b]
        halves = [q] if self.bits == 8 else [q & 0x0F, q >> 4]
        scale, low = self.scales(a, b)
        out = []
        for h in halves:
            g = h.to(torch.float32).view(b - a, scale.shape[1], -1)                      # (rows, groups, per group)
            g.mul_(scale)                    # in place: broadcasting out-of-place ops were ~10x slower here
            if with_low and low is not None:
                g.add_(low)
            out.append(g.view(b - a, -1) if dtype == torch.float32 else g.view(b - a, -1).to(dtype))
        return out, (None if with_low else low)

    def dequantize_rows(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [a, b) of the weight, (b - a, in) in `dtype` (computed in float32)."""
        cols, _ = self._columns(a, b, dtype)
        return cols[0] if len(cols) == 1 else torch.stack(cols, dim=-1).view(b - a, self.width)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) @ W.T (+ bias), W dequantized CHUNK_ELEMENTS at a time. The minimums
        are not added to the weight (a pass over it) but to the result: sum over groups g of
        min[o, g] * (sum of x over g), one small matmul."""
        if x.shape[-1] != self.width:
            raise ValueError(f"input width {x.shape[-1]} != quantized weight width {self.width}")
        out = self.parts["gq"].shape[0]
        step = max(1, CHUNK_ELEMENTS // self.width)
        x2 = x.reshape(-1, self.width)                                                    # (M, in)
        xs = [x2] if self.bits == 8 else [x2[:, 0::2].contiguous(), x2[:, 1::2].contiguous()]  # int4: even, odd
        groups = self.parts["gscale"].shape[1]
        x_sums = x2.view(x2.shape[0], groups, self.group).sum(-1)                         # (M, groups)
        y = torch.empty(x2.shape[0], out, dtype=x.dtype)                                   # (M, out)
        for a in range(0, out, step):
            b = min(out, a + step)
            cols, low = self._columns(a, b, x.dtype, with_low=False)
            if low is None:
                y[:, a:b].zero_()
            else:
                torch.mm(x_sums, low.view(b - a, groups).t().to(x.dtype), out=y[:, a:b])
            for xh, w in zip(xs, cols):
                y[:, a:b].addmm_(xh, w.t())
        y = y.view(*x.shape[:-1], out)
        return y if bias is None else y + bias

    def __repr__(self) -> str:
        return f"GroupWeight(int{self.bits}, out={self.parts['gq'].shape[0]}, in={self.width}, group={self.group})"


def take_group_weights(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a block's tensors into {base: GroupWeight} and the rest."""
    bases = {n[: -len(".gq")] for n in tensors if n.endswith(".gq")}
    weights = {b: GroupWeight({s: tensors[f"{b}.{s}"] for s in SUFFIXES if f"{b}.{s}" in tensors}) for b in bases}
    rest = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in bases}
    return weights, rest


# --- GGUF blocks -> group forms ----------------------------------------------------------

def _f16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).copy()).squeeze(-1)


def _pack4(q: np.ndarray) -> torch.Tensor:
    """uint8 (rows, in) values 0..15 -> (rows, in / 2), low nibble the even column."""
    return torch.from_numpy(np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4)))


def _halves(qs: np.ndarray) -> np.ndarray:
    """ggml's legacy nibble order: byte j holds element j (low) and j + 16 (high) of a block
    of 32 -> (..., 32) in element order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5's 32 fifth bits (4 bytes, little-endian) -> (..., 32) of 0 / 16."""
    return (np.unpackbits(qh, axis=-1, bitorder="little") << 4).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, (..., 8) each."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def from_gguf(raw: np.ndarray, type_name: str, width: int) -> GGUFQuantized:
    """Raw GGUF rows, uint8 (rows, row_bytes), of a quantized type -> its group form."""
    rows = raw.shape[0]
    if type_name not in _CONVERT:
        raise ValueError(f"GGML type {type_name} has no group form")
    b = raw.reshape(rows, -1, _CONVERT[type_name][1])                                     # (rows, blocks, bytes)
    parts = _CONVERT[type_name][0](b, rows)
    return GGUFQuantized(parts, width)


def _q8_0(b, rows):
    return {"gq": torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1)),
            "gscale": _f16(b[..., 0:2])}


def _q4_0(b, rows):
    return {"gq": _pack4(_halves(b[..., 2:]).reshape(rows, -1)), "gscale": _f16(b[..., 0:2])}


def _q4_1(b, rows):
    return {"gq": _pack4(_halves(b[..., 4:]).reshape(rows, -1)), "gscale": _f16(b[..., 0:2]), "gmin": _f16(b[..., 2:4])}


def _q5_0(b, rows):
    q = (_halves(b[..., 6:]) | _high_bits(b[..., 2:6])).astype(np.int8) - 16
    return {"gq": torch.from_numpy(q.reshape(rows, -1)), "gscale": _f16(b[..., 0:2])}


def _q5_1(b, rows):
    q = (_halves(b[..., 8:]) | _high_bits(b[..., 4:8])).astype(np.int8)
    return {"gq": torch.from_numpy(q.reshape(rows, -1)), "gscale": _f16(b[..., 0:2]), "gmin": _f16(b[..., 2:4])}


def _two_level(q, sc, mn, b, rows):
    parts = {"gq": q, "gscale": torch.from_numpy(np.ascontiguousarray(sc).reshape(rows, -1)),
             "gd": _f16(b[..., 0:2]), "gfirst": torch.tensor([0])}
    if mn is not None:
        parts["gmin"] = torch.from_numpy(np.ascontiguousarray(mn).reshape(rows, -1))
        parts["gdmin"] = _f16(b[..., 2:4])
    return parts


def _q4_k(b, rows):
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 16:].reshape(rows, -1, 4, 32)                                             # chunk c: sub-blocks 2c, 2c+1
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1)                          # (rows, in)
    return _two_level(_pack4(q), sc, mn, b, rows)


def _q5_k(b, rows):
    sc, mn = _k_scales(b[..., 4:16])
    qh = b[..., 16:48].reshape(rows, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    qs = b[..., 48:].reshape(rows, -1, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1, 8, 32)
    q = (low | ((qh & 1) << 4)).astype(np.int8).reshape(rows, -1)
    return _two_level(torch.from_numpy(q), sc, mn, b, rows)


def _q6_k(b, rows):
    ql, qh, scales = b[..., :128], b[..., 128:192], b[..., 192:208]
    low = ql.reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    low = (low & 0x0F).reshape(rows, -1, 8, 32)
    high = qh.reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    high = (high & 0x03).reshape(rows, -1, 8, 32)
    q = (low | (high << 4)).astype(np.int8) - 32
    parts = {"gq": torch.from_numpy(q.reshape(rows, -1)),
             "gscale": torch.from_numpy(np.ascontiguousarray(scales).view(np.int8).reshape(rows, -1)),
             "gd": _f16(b[..., 208:210]), "gfirst": torch.tensor([0])}
    return parts


# GGML type -> (converter, bytes per block)
_CONVERT = {"Q8_0": (_q8_0, 34), "Q4_0": (_q4_0, 18), "Q4_1": (_q4_1, 20), "Q5_0": (_q5_0, 22),
            "Q5_1": (_q5_1, 24), "Q4_K": (_q4_k, 144), "Q5_K": (_q5_k, 176), "Q6_K": (_q6_k, 210)}
GROUP_TYPES = tuple(_CONVERT)

