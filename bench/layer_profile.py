"""Where one shard's decode step spends its time, section by section (a harness for finding
bottlenecks, not a product figure): SmolLM2 with default settings (bfloat16 store, fused
qkv / gate_up), the step of device 0 of an N-device plan run alone, its all-reduces and
gather left out (an identity communicator: `tpi generate`'s and `/api/cluster`'s per-token
breakdown give the collectives' share), after a 20-token prompt and a warm-up.

The model's functions are wrapped with wall-clock timers (each wrap costs well under a
microsecond); "glue" is the step's time outside every timed section: the layer loop, views,
transposes, block hand-outs, Python. Prints microseconds per decode step per section, and
the step with and without the timers.

    python bench/layer_profile.py --devices 1 --threads 2
    python bench/layer_profile.py --devices 4 --threads 1     # a quarter shard, as in the cluster
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch

import tpi.model.shard as shard_mod
from tpi.engine import build_inproc_engine
from tpi.host import configure_torch
from tpi.model.kvcache import KVCache
from tpi.settings import ModelSettings, RuntimeOptions


class Alone:
    """The shard's collectives as identities: only this device's own work is timed."""
    rank, world_size = 0, 1

    def all_reduce(self, t):
        return t

    def gather(self, t):
        return t[None]


SPENT: dict[str, float] = defaultdict(float)


def timed(name, fn, label=None):
    def wrapper(*args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        SPENT[label(*args) if label else name] += time.perf_counter() - t
        return out
    return wrapper


def instrument(runner) -> None:
    """Wrap the step's functions; matmuls are named by their weight (qkv, o, gate_up, down)."""
    names = {}
    for kind in ("attn", "mlp"):
        for key, w in runner.blocks.get(0, kind).items():
            names[tuple(w.shape)] = key
    lin = shard_mod.linear
    shard_mod.linear = timed("linear", lin, lambda x, w, *a: "matmul " + names.get(tuple(w.shape), "?"))
    shard_mod.rms_norm = timed("rms_norm", shard_mod.rms_norm)
    shard_mod.apply_rope = timed("rope", shard_mod.apply_rope)
    shard_mod.gated = timed("act(gate) * up", shard_mod.gated)
    KVCache.write = timed("kv write", KVCache.write)
    KVCache.read = timed("kv read", KVCache.read)
    cls = shard_mod.ShardRunner
    cls._decode_attention = timed("attention (2 matmuls, softmax)", cls._decode_attention)
    cls.head_candidates = timed("output head + top-k", cls.head_candidates)
    cls.step_context = timed("step context (rope tables, mask)", cls.step_context)


def measure(runner, steps: int, start: int) -> tuple[float, float]:
    """(wall, CPU) seconds per decode step; the CPU time (this thread's, with one torch thread
    the whole of it) is the steadier figure on a loaded machine."""
    H, comm = runner.cfg.hidden_size, Alone()
    t, c = time.perf_counter(), time.thread_time()
    for i in range(steps):
        runner.step(torch.randn(1, 1, H), comm, [0], [start + i])
    return (time.perf_counter() - t) / steps, (time.thread_time() - c) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1, help="device 0 of this many (even weights)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: tpi's own choice)")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    configure_torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_inproc_engine(ModelSettings(weights=(1.0,) * args.devices), RuntimeOptions())
    try:
        runner = engine.cluster.runners[0]
        with torch.no_grad():
            runner.forward(torch.randn(1, 20, runner.cfg.hidden_size), Alone(), [0], [0])  # the prompt
            measure(runner, 10, 20)
            plain, plain_cpu = measure(runner, args.steps, 30)
            instrument(runner)
            measure(runner, 10, 30 + args.steps)
            SPENT.clear()
            timed_step, _ = measure(runner, args.steps, 40 + args.steps)
    finally:
        engine.close()
    per = {k: v / args.steps * 1e6 for k, v in SPENT.items()}
    head = per.pop("output head + top-k")
    body = timed_step * 1e6 - head
    per["glue (loop, views, Python)"] = body - sum(per.values())
    print(f"SmolLM2 bf16, device 0 of {args.devices}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}: step {plain * 1e6:.0f} us untimed (CPU {plain_cpu * 1e6:.0f} us), {timed_step * 1e6:.0f} us timed "
          f"(layers {body:.0f} = {body / runner.cfg.num_layers:.1f} per layer, head {head:.0f})")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {k:36s} {v:8.0f} us  {v / body * 100:5.1f}% of the layers")


if __name__ == "__main__":
    main()
