"""Time one float32 `linear` call of a GGUF weight in the two forms a float32 device can hold,
alternating in each round (the machine is shared: read the ratios): the int4 kernel's form
(tpi.weights.gguf_kernels: decode rows as a 2-row bfloat16 split, prefill rows dequantized
to float32) and the exact numba form (tpi.weights.gguf_exact, the default), for decode rows
(M 1), a speculative verification (M 5) and a prefill block (M 32).

    python bench/gguf_exact.py [--threads 1] [--rounds 3]"""
from __future__ import annotations

import numpy as np
import torch

from gguf_linear import SHAPES, bench_args, ms, raw
from tpi.weights.gguf_exact import ExactGroupWeight
from tpi.weights.gguf_kernels import group_kernel_form
from tpi.weights.gguf_quant import GroupWeight, from_gguf

K_SHAPES = ((1536, 1536), (4096, 4096))  # K-quants need whole 256-column blocks (SmolLM2's 576 is not)


def k_raw(type_name: str, rows: int, width: int) -> np.ndarray:
    """The gguf package quantizes no K-quant: the tests' own Q4_K writer."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gguf_models import quantized

    w = np.random.default_rng(0).normal(size=(rows, width)).astype(np.float32) * 0.02
    return np.asarray(quantized(w, type_name)[0]).view(np.uint8).reshape(rows, -1)


def main() -> None:
    args = bench_args()
    print("| type | weight | M | int4 kernel form (ms) | exact numba form (ms) | exact / kernel |")
    print("|---|---|---|---|---|---|")
    cases = [(t, s, raw) for t in ("Q4_1", "Q8_0") for s in SHAPES] + [("Q4_K", s, k_raw) for s in K_SHAPES]
    for type_name, (rows, width), make in cases:
        stored = GroupWeight(dict(from_gguf(make(type_name, rows, width), type_name, width).parts))
        kernel = group_kernel_form(stored, torch.bfloat16)     # the kernel form; float32 inputs take its float32 paths
        exact = ExactGroupWeight(stored)
        for m in (1, 5, 32):
            x = torch.randn(m, width)                                                   # (M, width) float32
            n = 20 if m < 32 else 5
            for _ in range(args.rounds):
                k = ms(lambda: kernel.linear(x), n)
                e = ms(lambda: exact.linear(x), n)
                print(f"| {type_name} | ({rows}, {width}) | {m} | {k:.3f} | {e:.3f} | {e / k:.2f} |", flush=True)


if __name__ == "__main__":
    main()
