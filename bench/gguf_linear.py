"""Time one `linear` call of a GGUF weight in the forms a device can hold, alternating in each
round (the machine is shared: read the ratios): the int4-kernel form that bfloat16 compute
uses (tpi.weights.gguf_kernels), the same kernel in float16, the stored form dequantized per
call (GroupWeight, what float32 and float16 compute use) and a dense bfloat16 matmul (what a
bfloat16 store holds), for a decode row (M 1) and a prefill block (M 32).

    python bench/gguf_linear.py [--threads 1] [--rounds 3]"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tpi.weights.gguf_kernels import group_kernel_form
from tpi.weights.gguf_quant import GroupWeight, from_gguf
from tpi.weights.quant import QuantizedWeight, repack_int4

SHAPES = ((1536, 576), (16384, 576), (4096, 4096))  # SmolLM2's MLP, a third of its head, a 7B projection


def raw(type_name: str, rows: int, width: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.random.default_rng(0).normal(size=(rows, width)).astype(np.float32) * 0.02
    return quantize(w, GGMLQuantizationType[type_name])


def ms(f, n: int) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def bench_args() -> argparse.Namespace:
    """--threads (torch's, set here) and --rounds, for this script and bench/gguf_exact.py."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = bench_args()
    print("| type | weight | M | kernel bf16 | kernel fp16 | GroupWeight bf16 | dense bf16 | kernel / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for type_name in ("Q4_1", "Q8_0"):
        for rows, width in SHAPES:
            stored = GroupWeight(dict(from_gguf(raw(type_name, rows, width), type_name, width).parts))
            kernel = group_kernel_form(stored, torch.bfloat16)
            dense = stored.dequantize_rows(0, rows, torch.bfloat16)                     # (rows, width)
            scale, low = (t.squeeze(-1) for t in stored.scales(0, rows)) if stored.bits == 4 else (None, None)
            fp16 = repack_int4(QuantizedWeight(stored.parts["gq"], scale, low), torch.float16) if scale is not None else None
            for m in (1, 32):
                x = torch.randn(m, width).bfloat16()                                    # (M, width)
                n = 20 if m == 1 else 5
                for r in range(args.rounds):
                    k = ms(lambda: kernel.linear(x), n)
                    h = ms(lambda: fp16.linear(x.half()), 2) if fp16 is not None else float("nan")
                    g = ms(lambda: stored.linear(x), 3)
                    d = ms(lambda: torch.nn.functional.linear(x, dense), n)
                    print(f"| {type_name} | ({rows}, {width}) | {m} | {k:.3f} | {h:.3f} | {g:.3f} | {d:.3f} | {k / d:.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()
