"""One TPI device of the memory benchmark (`bench/memory.py device`, started by memory_run.py
in its cgroup): builds its runner from the shard store, joins the others over torch.distributed
gloo on localhost, and writes its timings and memory figures to a JSON file."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from memory_model import PROMPT


def device_main(args) -> None:
    """One device: rank 0 also reads the embedding rows and drives generation (as the master does)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    import torch.distributed as dist

    from tpi.comm.gloo import GlooCommunicator, make_store
    from tpi.settings import RuntimeOptions
    from tpi.engine import build_runner, open_embedding
    from tpi.host import peak_rss_bytes, rss_bytes
    from tpi.weights.retention import block_costs
    from tpi.weights.store import ShardStore

    rank, world = args.rank, args.world
    tcp = make_store("127.0.0.1", args.port, world, rank == 0, 120.0)
    comm = GlooCommunicator(rank, world, tcp, 120.0, wire_dtype=torch.float32)
    idle_rss = rss_bytes()
    opts = RuntimeOptions(**json.loads(args.opts))
    store = ShardStore(args.store)
    embedder = open_embedding(store, opts.torch_compute_dtype()) if rank == 0 else None
    t0 = time.perf_counter()
    runner = build_runner(store, rank, opts)
    build_s = time.perf_counter() - t0
    after_build_rss = rss_bytes()
    H = store.config.hidden_size
    result: dict = {"rank": rank, "idle_rss": idle_rss, "build_s": build_s, "after_build_rss": after_build_rss}

    def step(x, slots, starts):
        ctrl = torch.tensor([x.shape[0], x.shape[1], starts[0], 1], dtype=torch.int64)
        dist.broadcast(ctrl, 0)
        dist.broadcast(x.float().contiguous(), 0)
        return runner.step(x, comm, slots, starts)

    if rank == 0:
        from tpi.cluster.base import Cluster
        from tpi.generation import Generator
        from tpi.model.sampling import SamplingParams

        class Bench(Cluster):
            world_size = world

            def forward(self, x, slots, starts, every_position=False):  # no drafter: never every position
                return step(x, slots, starts)

            def breakdowns(self):
                return [runner.last]

        gen = Generator(store.config, embedder, Bench(), None, opts.max_seq)
        gen.generate(PROMPT, SamplingParams(max_new_tokens=2))               # warm-up
        r = gen.generate(PROMPT, SamplingParams(max_new_tokens=args.tokens))
        dist.broadcast(torch.tensor([0, 0, 0, 0], dtype=torch.int64), 0)    # stop
        result.update(ttft_s=r.ttft_s, token_latency_s=r.token_latency_s, step_times_s=r.step_times_s,
                      tokens=r.tokens, breakdown=r.breakdowns[0].to_json())
    else:
        steps = 0
        while True:
            ctrl = torch.empty(4, dtype=torch.int64)
            dist.broadcast(ctrl, 0)
            if ctrl[3].item() == 0:
                break
            B, T, start = (int(v) for v in ctrl[:3])
            x = torch.empty(B, T, H, dtype=torch.float32)
            dist.broadcast(x, 0)
            runner.step(x, comm, list(range(B)), [start] * B)
            steps += 1
        result["steps"] = steps
    describe = getattr(runner.blocks, "describe", None)
    result.update(peak_rss=peak_rss_bytes(), kv_bytes=runner.cache.nbytes,
                  blocks=describe() if describe else None,
                  largest_block=max(block_costs(store, rank, opts.torch_compute_dtype())),
                  head_bytes=0)  # the output head is in every device's slice; the master holds no table
    Path(args.result).write_text(json.dumps(result))
    runner.blocks.close()
    comm.close()
