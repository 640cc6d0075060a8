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

`pack_block` turns a block's tensors into what the model's `linear` consumes: plain tensors
stay tensors, each `x.qweight`/`x.scale`[/`x.min`] set becomes one `QuantizedWeight` under `x`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QUANT_DTYPES = ("int8", "int4")
INT4_GROUP = 32
# Local names of the 2-D projection weights of a block (see tpi.weights.slicing).
PROJECTIONS = frozenset({"q", "k", "v", "o", "gate", "up", "down"})
QWEIGHT, SCALE, MIN = ".qweight", ".scale", ".min"


class QuantizedWeight:
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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

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
    if scheme == "int8":
        return {"scheme": "int8", "granularity": "output channel", "symmetric": True}
    return {"scheme": "int4", "group": INT4_GROUP, "symmetric": False, "packing": "low nibble first"}


def quantize(w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """{"qweight", "scale"[, "min"]} of W (out, in) under `scheme` (int8 or int4)."""
    if scheme == "int8":
        return quantize_int8(w)
    if scheme == "int4":
        return quantize_int4(w)
    raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(QUANT_DTYPES)}")


def quantize_tensors(tensors: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """A block's tensors with each 2-D projection weight `x` replaced by x.qweight, x.scale..."""
    out = {}
    for name, t in tensors.items():
        if name in PROJECTIONS and t.dim() == 2:
            for part, q in quantize(t, scheme).items():
                out[f"{name}.{part}"] = q
        else:
            out[name] = t
    return out


def pack_block(tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> tuple[dict, int]:
    """What `linear` and the norms consume, from a block's stored tensors, plus the bytes of
    any copies made. Quantized sets become QuantizedWeight (no copy); float tensors of
    another dtype are converted to `compute_dtype` (a copy); others are used as they are."""
    block: dict = {}
    copied = 0
    quantized = {name[: -len(QWEIGHT)] for name in tensors if name.endswith(QWEIGHT)}
    for base in quantized:
        if base + SCALE not in tensors:
            raise ValueError(f"quantized weight {base} has no {base}{SCALE}")
        block[base] = QuantizedWeight(tensors[base + QWEIGHT], tensors[base + SCALE], tensors.get(base + MIN))
    for name, t in tensors.items():
        base, dot, _ = name.rpartition(".")
        if dot and base in quantized:
            continue
        if t.is_floating_point() and t.dtype != compute_dtype:
            block[name] = t.to(compute_dtype)
            copied += block[name].nbytes
        else:
            block[name] = t
    return block, copied


def packed_copy_bytes(tensors: dict, compute_dtype: torch.dtype) -> int:
    """Bytes `pack_block` will copy, from a manifest's {name: {"shape", "dtype"}}."""
    size = torch.empty((), dtype=compute_dtype).element_size()
    total = 0
    for name, info in tensors.items():
        if name.endswith((QWEIGHT, SCALE, MIN)):
            continue
        dtype = getattr(torch, info["dtype"])
        if dtype.is_floating_point and dtype != compute_dtype:
            n = 1
            for d in info["shape"]:
                n *= d
            total += n * size
    return total
