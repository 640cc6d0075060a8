"""Quantized projection weights: the one place that knows their representation.

A 2-D weight W (out, in) named `x` in a block file is stored as:

  int8 (per output channel, symmetric):
    x.qweight  int8    (out, in)            q = round(W / scale), in [-127, 127]
    x.scale    float32 (out,)               max|W[o, :]| / 127;  W ~ q * scale
  int4 (groups of `group` = 32 along the input dimension, asymmetric, two values per byte):
    x.qweight  uint8   (out, in_pad / 2)    low nibble: even column, high nibble: odd column,
                                            q = round((W - min) / scale), in [0, 15]
    x.scale    float16 (out, in_pad / group)  (max - min) / 15 of the group
    x.min      float16 (out, in_pad / group)  min of the group;  W ~ q * scale + min

in_pad is `in` rounded up to a whole group (the last column repeated, so the padding does
not move the group's min/max); the true `in` is the width of the activation that meets the
weight, so it is not stored. The scheme is told apart by the dtype of qweight.
Norms and biases are never quantized.

Why int4 has a per-group minimum: symmetric int4 (15 levels around zero) wastes levels on
groups that are not centred on zero; the min/scale pair (as GGUF's Q4_1) uses all 16.
On SmolLM2 (teacher-forced top-1 agreement with bfloat16 over 256 positions) symmetric
int4 g32 reached 48%, this scheme 100% (SmolLM2 here is itself converted from a Q4_1 GGUF,
whose grid this scheme reproduces exactly; see docs/quantization.md).

`tpi.weights.packing.pack_block` turns a block's tensors into what the model's `linear`
consumes, through `kernel_form` here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tpi.weights.gguf_exact import ExactGroupWeight
from tpi.weights.gguf_quant import GroupWeight

QUANT_DTYPES = ("int8", "int4")
INT4_GROUP = 32
# Local names of the 2-D projection weights of a block (see tpi.weights.slicing).
PROJECTIONS = frozenset({"q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up"})
# Projections each scheme leaves in bfloat16. Per-channel int8 of all seven agrees with the
# bfloat16 model on 93% of SmolLM2's teacher-forced positions; keeping these four agrees on
# 97% (the issue's target), at 41% of SmolLM2's projection weights (47% of Llama-2-7B's)
# kept at 2 bytes. Measurements and what else was tried: docs/quantization.md.
UNQUANTIZED = {"int8": frozenset({"q", "k", "v", "qkv", "down"}), "int4": frozenset()}
QWEIGHT, SCALE, MIN = ".qweight", ".scale", ".min"


class WeightTensors:
    """What every stored-weight form shares: the tensors it holds, and their bytes."""

    __slots__ = ()

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


class QuantizedWeight(WeightTensors):
    """A quantized (out, in) weight; `linear` dequantizes it on the fly."""

    __slots__ = ("qweight", "scale", "minimum")

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None):
        if qweight.dim() != 2:
            raise ValueError(f"qweight must be 2-D, got shape {tuple(qweight.shape)}")
        if qweight.dtype == torch.int8:
            if scale.shape != (qweight.shape[0],) or minimum is not None:
                raise ValueError(f"int8 needs a scale of shape ({qweight.shape[0]},) and no min, "
                                 f"got {tuple(scale.shape)}")
        elif qweight.dtype == torch.uint8:
            if scale.dim() != 2 or scale.shape[0] != qweight.shape[0] or (2 * qweight.shape[1]) % scale.shape[1]:
                raise ValueError(f"int4 scale {tuple(scale.shape)} does not fit packed weight {tuple(qweight.shape)}")
            if minimum is None or minimum.shape != scale.shape:
                raise ValueError(f"int4 needs a min of the scale's shape {tuple(scale.shape)}")
        else:
            raise ValueError(f"qweight must be int8 or uint8 (int4 packed), got {qweight.dtype}")
        self.qweight, self.scale, self.minimum = qweight, scale, minimum

    @property
    def bits(self) -> int:
        return 8 if self.qweight.dtype == torch.int8 else 4

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def group(self) -> int:
        """Input columns per scale (the whole row for int8)."""
        if self.bits == 8:
            return self.qweight.shape[1]
        return 2 * self.qweight.shape[1] // self.scale.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qweight, self.scale, self.minimum) if t is not None]

    def dequantize(self, dtype: torch.dtype = torch.float32, in_features: int | None = None) -> torch.Tensor:
        """The weight (out, in) in `dtype`."""
        if self.bits == 8:
            w = self.qweight.to(dtype) * self.scale.to(dtype)[:, None]                # (out, in)
            return w if in_features is None else w[:, :in_features]
        out, half = self.qweight.shape
        groups = self.scale.shape[1]
        q = unpack_int4(self.qweight).to(dtype).view(out, groups, -1)                 # (out, G, group)
        w = q * self.scale.to(dtype)[:, :, None] + self.minimum.to(dtype)[:, :, None]
        w = w.view(out, 2 * half)                                                     # (out, in_pad)
        return w if in_features is None else w[:, :in_features]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) @ W.T (+ bias), computed in x's dtype."""
        in_features = x.shape[-1]
        if self.bits == 8:
            if in_features != self.qweight.shape[1]:
                raise ValueError(f"input width {in_features} != weight width {self.qweight.shape[1]}")
            # The per-row scale commutes with the product: scale the (..., out) result
            # instead of the (out, in) weight.
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
            return y if bias is None else y + bias
        pad = 2 * self.qweight.shape[1] - in_features
        if not 0 <= pad < self.group:
            raise ValueError(f"input width {in_features} does not match int4 weight of padded width "
                             f"{2 * self.qweight.shape[1]} (group {self.group})")
        return F.linear(x, self.dequantize(x.dtype, in_features), bias)

    def __repr__(self) -> str:
        return f"QuantizedWeight(int{self.bits}, out={self.out_features}, group={self.group})"


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out, n) -> uint8 (out, 2n) in [0, 15], even columns from the low nibbles."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], -1)


# --- kernel forms: what `linear` multiplies with ----------------------------------------
#
# torch's CPU weight-only kernels (aten::_weight_int8pack_mm, aten::_weight_int4pack_mm_for_cpu)
# multiply by the quantized weight without materialising it in the compute dtype. int8 uses the
# stored tensors as they are. int4's kernel wants its own packed layout, which depends on the
# CPU's vector width (AVX2 and AVX512 builds pack differently), so the store keeps the portable
# low-nibble-first layout above and each device repacks a block once, when it loads it.

_HAS_INT8_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")
HAS_INT4_MM = (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
                and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
INT4_ROWS = 16          # the int4 kernel's output rows come in multiples of this


class Int8Weight(WeightTensors):
    """int8 (out, in) with a per-row scale in the compute dtype, for aten::_weight_int8pack_mm."""

    __slots__ = ("qweight", "scale")
    bits = 8

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        self.qweight, self.scale = qweight, scale      # (out, in) int8, (out,) compute dtype

    def tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scale]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out, width = self.qweight.shape
        if x.shape[-1] != width:
            raise ValueError(f"input width {x.shape[-1]} != weight width {width}")
        y = torch._weight_int8pack_mm(x.reshape(-1, width).contiguous(), self.qweight, self.scale)
        y = y.view(*x.shape[:-1], out)                                              # (..., out)
        return y if bias is None else y + bias

    def __repr__(self) -> str:
        return f"Int8Weight(out={self.qweight.shape[0]}, in={self.qweight.shape[1]})"


class Int4Weight(WeightTensors):
    """int4 in the CPU kernel's packed layout, for aten::_weight_int4pack_mm_for_cpu.

    The kernel computes W = (q - 8) * scale + zero per group, so zero = min + 8 * scale.
    Rows are padded to the kernel's row block (zero scale and zero: they produce 0, cut off)."""

    __slots__ = ("packed", "scales_zeros", "out_features", "group")
    bits = 4

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, group: int):
        self.packed = packed                # (out_pad, in_pad / 2) uint8, kernel layout
        self.scales_zeros = scales_zeros    # (in_pad / group, out_pad, 2) compute dtype
        self.out_features, self.group = out_features, group

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_zeros]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        in_pad = 2 * self.packed.shape[1]
        pad = in_pad - x.shape[-1]
        if not 0 <= pad < self.group:
            raise ValueError(f"input width {x.shape[-1]} does not match int4 weight of padded width "
                             f"{in_pad} (group {self.group})")
        x2 = x.reshape(-1, x.shape[-1])                                             # (M, in)
        x2 = F.pad(x2, (0, pad)) if pad else x2.contiguous()                        # (M, in_pad)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)
        y = y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)     # (..., out)
        return y if bias is None else y + bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Rows `ids` of the weight, float32 (n, in_pad), unpacked from the kernel's layout (see
        `_native_int4`); None if the layout is not known."""
        block_n = kernel_block_n()
        if block_n is None:
            return None
        h, (rows, half) = block_n // 2, self.packed.shape
        native = self.packed.view(rows // block_n, half, 2, block_n // 2)             # (NB, in/2, 2, h)
        i = ids % block_n
        byte = native[ids // block_n, :, :, i % h]                                    # (n, in/2, 2)
        q = torch.where((i >= h)[:, None, None], byte >> 4, byte & 0x0F).reshape(len(ids), -1, self.group)
        sz = self.scales_zeros[:, ids].float().transpose(0, 1)                        # (n, groups, 2)
        w = (q.float() - 8) * sz[..., :1] + sz[..., 1:]                               # (n, groups, group)
        return w.reshape(len(ids), -1)

    def __repr__(self) -> str:
        return f"Int4Weight(out={self.out_features}, in_pad={2 * self.packed.shape[1]}, group={self.group})"


class DenseWeight(WeightTensors):
    """A quantized weight dequantized once, at load, into the compute dtype (float32 compute:
    torch's float32 weight-only kernels are slower than a float32 matmul, see
    docs/quantization.md). Holds (out, in_pad); `linear` uses the activation's width."""

    __slots__ = ("weight", "bits", "group")

    def __init__(self, weight: torch.Tensor, bits: int, group: int):
        self.weight, self.bits, self.group = weight, bits, group          # (out, in_pad) compute dtype

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        pad = self.weight.shape[1] - x.shape[-1]
        if not 0 <= pad < (self.group if self.bits == 4 else 1):
            raise ValueError(f"input width {x.shape[-1]} does not match weight width {self.weight.shape[1]}")
        return F.linear(x, self.weight[:, :x.shape[-1]] if pad else self.weight, bias)

    def __repr__(self) -> str:
        return f"DenseWeight(int{self.bits} as {self.weight.dtype}, {tuple(self.weight.shape)})"


def int4_kernel_bytes(out: int, in_pad: int, group: int, dtype: torch.dtype) -> int:
    """Bytes of an Int4Weight: the repacked weight plus scales and zeros in `dtype`."""
    step = kernel_block_n() or INT4_ROWS
    out_pad = -(-out // step) * step
    elem = torch.empty((), dtype=dtype).element_size()
    return out_pad * in_pad // 2 + (in_pad // group) * out_pad * 2 * elem


def _native_int4(stored: torch.Tensor, block_n: int) -> torch.Tensor:
    """Stored int4 bytes (rows, in_pad/2), rows a multiple of block_n -> the CPU kernel's layout:
    per block of block_n rows, per input column k, block_n/2 bytes whose low nibble is row i
    and high nibble row i + block_n/2. Byte operations on whole tensors (no int32 copy; row
    chunks were 4x slower here: each op's thread barrier costs more than its work)."""
    rows, half = stored.shape
    h = block_n // 2
    s = stored.view(rows // block_n, 2, h, half).transpose(2, 3)                  # (NB, 2, in/2, h)
    a, b = s[:, 0].contiguous(), s[:, 1].contiguous()                             # rows i, i + h
    native = torch.empty(rows // block_n, half, 2, h, dtype=torch.uint8)          # (NB, in/2, 2, h)
    torch.bitwise_or(a & 0x0F, (b & 0x0F) << 4, out=native[:, :, 0])              # column 2j
    torch.bitwise_or(a >> 4, b & 0xF0, out=native[:, :, 1])                       # column 2j + 1
    return native.view(rows, half)


_BLOCK_N: list = []   # the kernel's row block, found once per process (None: unknown layout)


def kernel_block_n() -> int | None:
    """Which row block the installed kernel packs with (AVX2 builds use 32, AVX512 64), found
    by packing a probe both ways; None if neither matches (then the kernel's own, slower,
    conversion is used)."""
    if not _BLOCK_N:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)      # (rows, in)
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        stored = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        _BLOCK_N.append(next((bn for bn in (32, 64) if torch.equal(_native_int4(stored, bn), want)), None))
    return _BLOCK_N[0]


def repack_int4(q: QuantizedWeight, dtype: torch.dtype) -> Int4Weight:
    out, half = q.qweight.shape
    group = q.group
    block_n = kernel_block_n()
    step = block_n or INT4_ROWS
    out_pad = -(-out // step) * step
    rows = q.qweight if out_pad == out else F.pad(q.qweight, (0, 0, 0, out_pad - out))  # (out_pad, in_pad/2)
    if block_n:
        packed = _native_int4(rows, block_n)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(rows).to(torch.int32), 2)
    scale, lo = q.scale.float(), q.minimum.float()                                  # (out, G)
    sz = torch.stack((scale, lo + 8 * scale), dim=-1)                               # (out, G, 2)
    if out_pad > out:
        sz = F.pad(sz, (0, 0, 0, 0, 0, out_pad - out))
    sz = sz.transpose(0, 1).to(dtype).contiguous()                                  # (G, out_pad, 2)
    return Int4Weight(packed, sz, out, group)


def _int8_kernel_fits(width: int, dtype: torch.dtype) -> bool:
    # torch 2.13's int8 kernel crashes (SIGSEGV) on bfloat16 / float16 inputs whose width is
    # not a multiple of 8 (seen at 66 and 67; float32 inputs take any width).
    return _HAS_INT8_MM and (dtype == torch.float32 or width % 8 == 0)


QUANTIZED_KINDS = (QuantizedWeight, Int8Weight, Int4Weight, DenseWeight, GroupWeight, ExactGroupWeight)  # what `linear` treats as quantized


def kernel_form(q: QuantizedWeight, dtype: torch.dtype) -> "Int8Weight | Int4Weight | QuantizedWeight":
    """What `linear` should multiply with in compute dtype `dtype`: float32, the weight
    dequantized once (a float32 matmul beats torch's float32 weight-only kernels); bfloat16 /
    float16, the kernel form when torch has the kernel; else the QuantizedWeight itself
    (dequantized on every call)."""
    if dtype == torch.float32:
        return DenseWeight(q.dequantize(torch.float32), q.bits, q.group)
    if dtype not in KERNEL_DTYPES:
        return q
    if q.bits == 8:
        if not _int8_kernel_fits(q.qweight.shape[1], dtype):
            return q
        # The kernel reads the weight with aligned vector loads when it has several input
        # rows: a weight at an address not a multiple of 16 crashes it (seen in torch 2.13 on
        # a view into a block file's buffer), so such a weight is copied once.
        aligned = q.qweight if q.qweight.data_ptr() % 64 == 0 else q.qweight.clone()
        return Int8Weight(aligned, q.scale.to(dtype))
    if HAS_INT4_MM and q.group in INT4_KERNEL_GROUPS:
        return repack_int4(q, dtype)
    return q


def kernel_copy_bytes(bits: int, out: int, width: int, groups: int, scale_dtype: torch.dtype,
                      dtype: torch.dtype) -> int:
    """Bytes `kernel_form` allocates for a stored weight (int8: width = in; int4: the
    packed width, in_pad / 2; groups: the scale's columns)."""
    if dtype == torch.float32:   # DenseWeight: (out, in or in_pad) float32
        return out * (width if bits == 8 else 2 * width) * 4
    if dtype not in KERNEL_DTYPES:
        return 0
    if bits == 8:
        fits = _int8_kernel_fits(width, dtype) and scale_dtype != dtype
        return out * torch.empty((), dtype=dtype).element_size() if fits else 0
    group = 2 * width // groups
    if HAS_INT4_MM and group in INT4_KERNEL_GROUPS:
        return int4_kernel_bytes(out, 2 * width, group, dtype)
    return 0


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """W (out, in) -> qweight int8 (out, in), scale float32 (out,)."""
    w = w.to(torch.float32)
    scale = w.abs().amax(dim=1) / 127.0                                             # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)           # (out, in)
    return {"qweight": q, "scale": scale}


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> dict[str, torch.Tensor]:
    """W (out, in) -> qweight uint8 (out, in_pad/2), scale and min float16 (out, in_pad/group)."""
    if group % 2:
        raise ValueError(f"int4 group must be even, got {group}")
    w = w.to(torch.float32)
    out, n = w.shape
    pad = -n % group
    if pad:  # repeat the last column: the padding moves no group's min or max
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)                        # (out, in_pad)
    g = w.view(out, -1, group)                                                        # (out, G, group)
    lo = g.amin(dim=2).to(torch.float16)                                              # (out, G)
    scale = ((g.amax(dim=2) - lo.float()) / 15.0).to(torch.float16)                  # (out, G)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo.float()[:, :, None]) / scale.float()[:, :, None]).clamp_(0, 15)
    q = q.to(torch.uint8).view(out, -1)                                               # (out, in_pad)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)                                           # (out, in_pad/2)
    return {"qweight": packed.contiguous(), "scale": scale, "min": lo}


def quant_format(scheme: str) -> dict:
    """What the manifest records about a quantized store (a store made otherwise is rebuilt)."""
    kept = sorted(UNQUANTIZED[scheme])
    if scheme == "int8":
        return {"scheme": "int8", "granularity": "output channel", "symmetric": True, "bfloat16": kept}
    return {"scheme": "int4", "group": INT4_GROUP, "symmetric": False, "packing": "low nibble first", "bfloat16": kept}


def quantize(w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """{"qweight", "scale"[, "min"]} of W (out, in) under `scheme` (int8 or int4)."""
    if scheme == "int8":
        return quantize_int8(w)
    if scheme == "int4":
        return quantize_int4(w)
    raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(QUANT_DTYPES)}")


def quantize_tensors(tensors: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """A block's tensors with each 2-D projection weight `x` the scheme quantizes replaced by
    x.qweight, x.scale..."""
    out = {}
    for name, t in tensors.items():
        if name in PROJECTIONS and name not in UNQUANTIZED[scheme] and t.dim() == 2:
            for part, q in quantize(t, scheme).items():
                out[f"{name}.{part}"] = q
        else:
            out[name] = t
    return out
