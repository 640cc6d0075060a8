"""The one table of dtypes: the names users give (`--dtype`, `--compute-dtype`, `--kv-dtype`,
`--wire-dtype`) and the names safetensors headers use, each mapped to its torch dtype."""
from __future__ import annotations

import torch

# Floating-point dtypes by their user-facing name: what can be stored, computed in, cached, sent.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}

# safetensors header names.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "BOOL": torch.bool,
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def float_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """'bfloat16' -> torch.bfloat16; an unknown name is refused naming the choices."""
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(FLOAT_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
