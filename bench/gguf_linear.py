"""Time GroupWeight.linear (tpi.weights.gguf_quant) against a float32 matmul of the same
weight, one (1, in) activation, alternating in each round (the machine is shared: read the
ratios). Usage: python bench/gguf_linear.py [--threads 1] [--rounds 3]"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tpi.weights.gguf_quant import GroupWeight, from_gguf


def raw_q4_1(rows: int, width: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(np.random.default_rng(0).normal(size=(rows, width)).astype(np.float32), GGMLQuantizationType.Q4_1)


def ms(f, n: int = 30) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for rows, width in ((1536, 576), (16384, 576)):  # SmolLM2's MLP, a third of its head
        form = from_gguf(raw_q4_1(rows, width), "Q4_1", width)
        weight, dense = GroupWeight(form.parts), form.dequantize()
        x = torch.randn(1, width)
        for r in range(args.rounds):
            g, d = ms(lambda: weight.linear(x)), ms(lambda: torch.nn.functional.linear(x, dense))
            print(f"Q4_1 ({rows}, {width}) round {r}: GroupWeight {g:.2f} ms, float32 matmul {d:.2f} ms ({g / d:.1f}x)")


if __name__ == "__main__":
    main()
