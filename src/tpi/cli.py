"""The `tpi` command line. Each subcommand parses its flags here and calls the library or
a service; heavy modules are imported only by the subcommand that needs them."""
from __future__ import annotations

import argparse
import json
import sys

from tpi.plan import PlanError, parse_weights


def device_weights(args) -> list[float]:
    if getattr(args, "weights", None):
        return parse_weights(args.weights)
    return [1.0] * (args.devices or 1)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF directory, 'smollm2' (default) or a hub id")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--devices", type=int, default=None, help="number of devices (even split)")
    split.add_argument("--weights", default=None, help="relative work per device, e.g. 1,1,2")
    p.add_argument("--dtype", default="bfloat16",
                   help="storage dtype: bfloat16 (default), float16, float32, or quantized int8 "
                        "(per output channel) / int4 (groups of 32)")
    p.add_argument("--compute-dtype", default=None, help="compute dtype (default: float32; bfloat16 halves weight memory)")
    p.add_argument("--max-seq", type=int, default=2048, help="context length (KV cache size)")
    p.add_argument("--max-block-size", default=None, metavar="SIZE",
                   help="shard store: cut MLP blocks and output-head slices bigger than this into pieces "
                        "(the window counts pieces; default 16MiB)")
    p.add_argument("--head-topk", type=int, default=128, metavar="K",
                   help="output-head candidates per device: sampling is exact for greedy and top-k <= K (default 128)")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=2,
                   help="streamed blocks held at once per device: the one in use and those being read (default 2)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="per device, for layer weights and KV cache, e.g. 800MB or 1.5GiB (default: the cgroup "
                        "limit minus what the process holds and a headroom; no limit: everything resident)")
    p.add_argument("--no-scheduler", action="store_true", help="load every block into memory once (no streaming)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype: float32, bfloat16, float16 (default: compute dtype)")


def runtime_options(args):
    from tpi.engine import RuntimeOptions
    from tpi.weights.scheduler import parse_size

    return RuntimeOptions(
        dtype=args.dtype, compute_dtype=args.compute_dtype, max_seq=args.max_seq,
        scheduler=not getattr(args, "no_scheduler", False), window=getattr(args, "window", 2),
        memory_budget=parse_size(args.memory_budget) if getattr(args, "memory_budget", None) else None,
        kv_dtype=getattr(args, "kv_dtype", None), head_topk=getattr(args, "head_topk", 128),
    )


def max_block_bytes(args) -> int:
    from tpi.weights.scheduler import parse_size
    from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES

    size = getattr(args, "max_block_size", None)
    return parse_size(size) if size else DEFAULT_MAX_BLOCK_BYTES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpi", description="Tensor-parallel LLM inference on edge devices")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text once and exit")
    add_model_args(g)
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw text prompt")
    prompt.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (the default unless --temperature)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--transport", choices=["inproc", "ws"], default="inproc",
                   help="inproc: shards as threads; ws: a master and N-1 worker processes on loopback")
    g.add_argument("--allreduce", choices=["star", "ring", "gloo"], default="star", help="with --transport ws")
    g.add_argument("--link", default=None, help='with --transport ws: emulate a link, e.g. "latency=5ms"')
    g.add_argument("--wire-dtype", default=None, help="with --transport ws: dtype of partial sums on the wire")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    add_memory_args(g)

    m = sub.add_parser("master", help="run the master: device 0, all-reduce hub, HTTP API")
    add_model_args(m)
    from tpi_master.main import add_args as add_master_args

    add_master_args(m)
    add_memory_args(m)

    k = sub.add_parser("worker", help="run a worker: join a master, compute its shard")
    from tpi_worker.main import add_args as add_worker_args

    add_worker_args(k)

    w = sub.add_parser("webui", help="run the chat web UI, relaying to a master's HTTP API")
    from tpi_webui.main import add_args as add_webui_args

    add_webui_args(w)

    b = sub.add_parser("bench", help="benchmarks: emulated testbed, baselines, report (docs/benchmarks.md)")
    from tpi.bench.cli import add_args as add_bench_args

    add_bench_args(b)

    p = sub.add_parser("prepare", help="split a model into a shard store")
    add_model_args(p)
    p.add_argument("--out", required=True, help="directory of the shard store")
    return parser


def cmd_prepare(args) -> int:
    from tpi.engine import prepare_store

    store = prepare_store(args.model, device_weights(args), args.dtype, args.out, max_block_bytes=max_block_bytes(args))
    total = sum(f.bytes for f in store.files.values())
    print(f"shard store at {store.root}: {store.plan.world_size} devices, {len(store.files)} files, "
          f"{total / 1e6:.1f} MB, dtype {store.dtype}")
    return 0


def cmd_generate(args) -> int:
    from contextlib import nullcontext

    from tpi.engine import build_inproc_engine
    from tpi.model.sampling import SamplingParams

    opts = runtime_options(args)
    if args.transport == "ws":
        from tpi_master.local_launch import LocalCluster

        context = LocalCluster(args, len(device_weights(args)))
    else:
        context = nullcontext(build_inproc_engine(args.model, device_weights(args), opts,
                                                  max_block_bytes=max_block_bytes(args)))
    with context as engine:
        try:
            tok = engine.tokenizer
            ids = tok.encode_chat([{"role": "user", "content": args.chat}]) if args.chat else tok.encode(args.prompt)
            params = SamplingParams(
                temperature=0.0 if args.greedy else args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens,
            )
            result = engine.generator.generate(ids, params)
            if args.json:
                print(json.dumps(generation_report(engine, result, args.transport)))
            else:
                print(result.text)
                print(f"[{len(result.tokens)} tokens, TTFT {result.ttft_s:.3f}s, "
                      f"{result.token_latency_s * 1000:.1f} ms/token, {engine.cluster.world_size} devices]",
                      file=sys.stderr)
        finally:
            if args.transport != "ws":
                engine.close()
    return 0


def generation_report(engine, result, transport: str) -> dict:
    """The `--json` object: tokens, text, timings, and per device memory and time split."""
    steps = max(1, len(result.tokens) - 1)  # decode steps the breakdowns sum over
    peaks = engine.cluster.peak_rss()
    devices = []
    for r, b in enumerate(result.breakdowns):
        summed = b.to_json(per_layer=True)
        per_token = {k: ([[x / steps for x in layer] for layer in v] if k == "layers"
                         else [x / steps for x in v] if k == "head" else v / steps)
                     for k, v in summed.items()}
        device = {"rank": r, "peak_rss_bytes": peaks[r], "breakdown": summed, "per_token": per_token}
        runners = getattr(engine.cluster, "runners", None)
        if runners is not None:  # in-process: every device shares this process's memory
            device["note"] = "all devices share one process (inproc)"
            describe = getattr(runners[r].blocks, "describe", None)
            device["kv_cache_bytes"] = runners[r].cache.nbytes
            device["blocks"] = describe() if describe else {"scheduler": "off (all resident)"}
        devices.append(device)
    return {
        "tokens": result.tokens, "text": result.text, "prompt_tokens": result.prompt_tokens,
        "ttft_s": result.ttft_s, "token_latency_s": result.token_latency_s,
        "finish_reason": result.finish_reason, "transport": transport,
        "world_size": engine.cluster.world_size, "decode_steps": steps, "devices": devices,
    }


def cmd_master(args) -> int:
    from tpi_master.main import run

    return run(args)


def cmd_worker(args) -> int:
    from tpi_worker.main import run

    return run(args)


def cmd_webui(args) -> int:
    from tpi_webui.main import run

    return run(args)


def cmd_bench(args) -> int:
    from tpi.bench.cli import run

    return run(args)


COMMANDS = {"generate": cmd_generate, "prepare": cmd_prepare, "master": cmd_master, "worker": cmd_worker,
            "webui": cmd_webui, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    from tpi.threads import prefer_passive_wait

    prefer_passive_wait()  # before torch loads: shards (threads or processes) share the cores
    try:
        return COMMANDS[args.command](args)
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"tpi {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
