"""From a block's stored tensors to what the model's `linear` and norms consume, and the bytes
of the copies that takes (one rule for the loader and for the budget that plans it).

Stored forms: plain tensors; int8 / int4 sets `x.qweight`, `x.scale`[, `x.min`]
(tpi.weights.quant); GGUF group forms `x.gq`, `x.gscale`, ... (tpi.weights.gguf_quant).
"""
from __future__ import annotations

import torch

from tpi.weights.gguf_kernels import group_kernel_bytes, group_kernel_form
from tpi.weights.gguf_quant import take_group_weights
from tpi.weights.quant import MIN, QWEIGHT, SCALE, QuantizedWeight, kernel_copy_bytes, kernel_form


def pack_block(tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype, gguf_exact: bool = False) -> tuple[dict, int]:
    """What `linear` and the norms consume, from a block's stored tensors, plus the bytes of
    any copies made. Quantized sets become their kernel form (int8: the stored weight and a
    scale in the compute dtype; int4: repacked for the CPU int4 kernel, a copy; GGUF forms:
    in float32 transposed for the exact numba kernels, in bfloat16 repacked for the int4
    kernel, in float16 as stored); float tensors of another dtype are converted to
    `compute_dtype` (a copy); others are used as they are."""
    groups, tensors = take_group_weights(tensors)
    block, copied = {}, 0
    for base, stored in groups.items():
        block[base] = group_kernel_form(stored, compute_dtype, gguf_exact)
        if block[base] is not stored:
            copied += block[base].nbytes
    quantized = {name[: -len(QWEIGHT)] for name in tensors if name.endswith(QWEIGHT)}
    for base in quantized:
        if base + SCALE not in tensors:
            raise ValueError(f"quantized weight {base} has no {base}{SCALE}")
        stored = QuantizedWeight(tensors[base + QWEIGHT], tensors[base + SCALE], tensors.get(base + MIN))
        block[base] = kernel_form(stored, compute_dtype)
        mine = {t.untyped_storage().data_ptr() for t in stored.tensors()}
        copied += sum(t.nbytes for t in block[base].tensors() if t.untyped_storage().data_ptr() not in mine)
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


def packed_copy_bytes(tensors: dict, compute_dtype: torch.dtype, gguf_exact: bool = False) -> int:
    """Bytes `pack_block` will copy, from a manifest's {name: {"shape", "dtype"}}."""
    size = torch.empty((), dtype=compute_dtype).element_size()
    total = 0
    gguf_forms = {name[: -len(".gq")] for name in tensors if name.endswith(".gq")}
    for name, info in tensors.items():
        if name.rpartition(".")[0] in gguf_forms:
            if name.endswith(".gq"):
                base = name[: -len(".gq")]
                groups = tensors[base + ".gscale"]["shape"][1]
                stored = sum(_nbytes(i) for n, i in tensors.items() if n.rpartition(".")[0] == base)
                total += group_kernel_bytes(tuple(info["shape"]), groups, stored, compute_dtype, gguf_exact)
            continue
        if name.endswith(QWEIGHT):
            base = name[: -len(QWEIGHT)]
            scale = tensors[base + SCALE]
            bits = 8 if info["dtype"] == "int8" else 4
            groups = scale["shape"][1] if bits == 4 else 1
            total += kernel_copy_bytes(bits, info["shape"][0], info["shape"][1], groups,
                                       getattr(torch, scale["dtype"]), compute_dtype)
            continue
        if name.endswith((SCALE, MIN)):
            continue
        dtype = getattr(torch, info["dtype"])
        if dtype.is_floating_point and dtype != compute_dtype:
            total += _nbytes(info) // dtype.itemsize * size
    return total


def _nbytes(info: dict) -> int:
    """Bytes of a manifest tensor {"shape", "dtype"}."""
    n = 1
    for d in info["shape"]:
        n *= d
    return n * getattr(torch, info["dtype"]).itemsize
