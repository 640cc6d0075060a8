"""Milliseconds per `linear` call, stored dtype against stored dtype, side by side.

    python bench/quant_linear.py [--out 11008 --in 4096 --rounds 7 --calls 5]

One (1, in) activation times an (out, in) weight (default: Llama-2-7B's MLP up/gate shape)
through `tpi.model.layers.linear`, for a bfloat16 weight and the int8 / int4 weights of
`tpi.weights.quant`, in both compute dtypes (float32 is the engine's default). The
on-the-fly path (`QuantizedWeight.linear`: int8 converts the weight to the compute dtype,
int4 dequantizes it, on every call) is timed beside the kernels `pack_block` chooses.
Rounds alternate the variants; the table gives the median of the per-round medians.
Also times `pack_block`'s one-off cost per block (what a streamed block pays per load).
Not a test: the figures are noisy on a shared machine; compare within one run.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from tpi.model.layers import linear
from tpi.weights.packing import pack_block
from tpi.weights.quant import Int8Weight, QuantizedWeight, repack_int4, quantize


def timed(fn, calls: int) -> float:
    """Median ms of `calls` calls of fn()."""
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=11008)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.out, args.inp) * 0.02                              # (out, in) float32
    stored = {"bfloat16": {"w": w.bfloat16()}}
    for scheme in ("int8", "int4"):
        stored[scheme] = {f"w.{k}": v for k, v in quantize(w, scheme).items()}

    variants = {}   # name -> (fn, weight bytes at rest); unlabelled rows: what pack_block chooses
    for cdt in (torch.float32, torch.bfloat16):
        x = torch.randn(1, args.inp).to(cdt)                                  # (1, in)
        c = str(cdt).removeprefix("torch.")
        for scheme, tensors in stored.items():
            block, _ = pack_block(tensors, cdt)
            wt = block["w"]
            nbytes = wt.nbytes
            variants[f"{scheme:8s} compute {c}"] = (lambda x=x, wt=wt: linear(x, wt), nbytes)
            if scheme != "bfloat16":
                raw = QuantizedWeight(tensors["w.qweight"], tensors["w.scale"], tensors.get("w.min"))
                if cdt == torch.float32:   # pack_block dequantizes instead; the kernels for the record
                    kern = Int8Weight(raw.qweight, raw.scale) if scheme == "int8" else repack_int4(raw, cdt)
                    variants[f"{scheme:8s} compute {c}, torch kernel (not chosen)"] = (
                        lambda x=x, kern=kern: linear(x, kern), kern.nbytes)
                variants[f"{scheme:8s} compute {c}, on the fly (QuantizedWeight.linear)"] = (
                    lambda x=x, raw=raw: raw.linear(x), raw.nbytes)

    rows = {name: [] for name in variants}
    for name, (fn, _) in variants.items():   # warm-up
        fn()
    for _ in range(args.rounds):
        for name, (fn, _) in variants.items():
            rows[name].append(timed(fn, args.calls))
    pack_ms = {}
    for scheme, tensors in stored.items():
        for cdt in (torch.float32, torch.bfloat16):
            pack_ms[(scheme, str(cdt).removeprefix("torch."))] = timed(lambda: pack_block(tensors, cdt), 3)

    print(f"# linear (1, {args.inp}) x ({args.out}, {args.inp}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} at the end; median of {args.rounds} rounds x {args.calls} calls")
    print(f"| weight | ms / call | weight MB at rest |")
    print(f"|---|---|---|")
    for name, (_, nbytes) in variants.items():
        print(f"| {name} | {statistics.median(rows[name]):.2f} | {nbytes / 1e6:.1f} |")
    print()
    print("| stored | compute | pack_block ms (once per block load) |")
    print("|---|---|---|")
    for (scheme, c), ms in pack_ms.items():
        print(f"| {scheme} | {c} | {ms:.1f} |")


if __name__ == "__main__":
    main()
