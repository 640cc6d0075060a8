"""The `tpi` command line: the one place where flags (and their environment variables) become
settings (tpi.settings, frozen dataclasses). Each subcommand then calls the engine or a
service with those settings; heavy modules are imported only by the subcommand that needs
them."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tpi.plan import PlanError, parse_weights


def device_weights(args) -> list[float]:
    if args.weights:
        return parse_weights(args.weights)
    return [1.0] * (args.devices or 1)


def model_settings(args):
    from tpi.settings import ModelSettings
    from tpi.weights.budget import parse_size
    from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES

    return ModelSettings(source=args.model, weights=tuple(device_weights(args)),
                         max_block_bytes=parse_size(args.max_block_size) if args.max_block_size
                         else DEFAULT_MAX_BLOCK_BYTES)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="FILE.gguf (or NAME-00001-of-0000N.gguf), local HF directory, "
                                                     "'smollm2' (default, its GGUF file) or a hub id")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--devices", type=int, default=None, help="number of devices (even split)")
    split.add_argument("--weights", default=None, help="relative work per device, e.g. 1,1,2")
    p.add_argument("--dtype", default=None,
                   help="storage dtype: gguf (a GGUF file's own quantization, held at about its size: the "
                        "default for a GGUF source, docs/quantization.md), bfloat16 (the default otherwise), "
                        "float16, float32, or quantized int8 (per output channel) / int4 (groups of 32)")
    p.add_argument("--compute-dtype", default=None, help="compute dtype (default: the storage dtype; bfloat16 for "
                   "int8/int4, float32 for gguf: the file's weights exactly); float32 upcasts every weight "
                   "of a float or int8/int4 store as it loads")
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


def runtime_options(args, num_slots: int = 1):
    from tpi.settings import RuntimeOptions
    from tpi.weights.budget import parse_size

    return RuntimeOptions(
        dtype=args.dtype, compute_dtype=args.compute_dtype or None, max_seq=args.max_seq, num_slots=num_slots,
        scheduler=not args.no_scheduler, window=args.window,
        memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
        kv_dtype=args.kv_dtype, head_topk=args.head_topk,
    ).for_source(args.model)


def add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default="ngram", metavar="ngram|MODEL|none",
                   help="speculative decoding: draft tokens from prompt lookup (ngram, the default), from a small "
                        "draft model with the same vocabulary run on the master (its source), or none")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help="draft tokens the cluster verifies per step, in one forward (default 4)")


def draft_settings(args):
    from tpi.settings import DraftSettings

    if args.draft_tokens < 0:
        raise ValueError(f"--draft-tokens must be 0 or more; got {args.draft_tokens}")
    return DraftSettings(drafter=None if args.draft == "none" else args.draft, tokens=args.draft_tokens)


def add_hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allreduce", choices=["star", "ring", "gloo"], default="star",
                   help="all-reduce over the hub (star, default), a ring of workers, or gloo (a benchmark baseline)")
    p.add_argument("--link", default=None, help='emulate a link on what this process sends, e.g. "latency=5ms"')
    p.add_argument("--wire-dtype", default=None, help="dtype of partial sums on the wire (default: compute dtype)")


def add_master_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", default="127.0.0.1:8000", help="HOST:PORT of the HTTP API (default port 8000)")
    p.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--slots", type=int, default=4, help="sequences that can decode together (batching)")
    p.add_argument("--listen", default=None, help="HOST:PORT where workers connect (WebSocket hub)")
    p.add_argument("--advertise", default=None,
                   help="HOST workers should use to reach this master (in the registry and on the LAN)")
    p.add_argument("--no-mdns", action="store_true",
                   help="do not advertise the hub on the LAN (DNS-SD over mDNS; only without --registry)")
    p.add_argument("--join-token", default=os.environ.get("TPI_JOIN_TOKEN"), help="shared secret workers must prove")
    p.add_argument("--insecure", action="store_true",
                   help="accept a default (change-me-...) or short (< 16 characters) join token: local demos only")
    p.add_argument("--expect-workers", type=int, default=None, help="workers to wait for (default: devices-1)")
    p.add_argument("--registry", default=os.environ.get("TPI_REGISTRY"), help="redis://[:PASSWORD@]HOST:PORT/DB")
    p.add_argument("--min-workers", type=int, default=0, help="with --registry: workers to wait for at start")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for --min-workers")
    add_hub_args(p)
    p.add_argument("--store", default=None, help="shard store directory (shared with workers); default: cache")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds an all-reduce may wait for a worker")
    p.add_argument("--tls-cert", default=os.environ.get("TPI_TLS_CERT"),
                   help="PEM certificate (chain): workers connect over wss:// (TLS)")
    p.add_argument("--tls-key", default=os.environ.get("TPI_TLS_KEY"),
                   help="PEM private key of --tls-cert (if not in the same file)")


def strong_token(token: str, insecure: bool) -> None:
    """Refuse a shipped default or short join token unless --insecure (comm/auth.py says why)."""
    from tpi.comm.auth import WeakSecret, check_secret

    try:
        check_secret(token, "the join token (--join-token / TPI_JOIN_TOKEN)", insecure)
    except WeakSecret as e:
        raise SystemExit(f"tpi: {e}") from None


def master_settings(args):
    """`tpi master` flags -> MasterSettings. Workers join when a hub is asked for (--listen,
    --expect-workers, or a registry); else every device runs in this process."""
    from tpi.settings import HubSettings, MasterSettings

    workers = args.expect_workers
    if workers is None:
        workers = (args.devices - 1 if args.devices else 0) if args.listen else 0
    hub = None
    if workers > 0 or args.registry:
        if not args.join_token:
            raise SystemExit("tpi master: --join-token (or TPI_JOIN_TOKEN) is required when workers join")
        strong_token(args.join_token, args.insecure)
        hub = HubSettings(join_token=args.join_token, listen=args.listen or "0.0.0.0:29500",
                          allreduce=args.allreduce, link=args.link, wire_dtype=args.wire_dtype,
                          timeout_s=args.timeout, start_timeout_s=args.start_timeout,
                          tls_cert=args.tls_cert, tls_key=args.tls_key)
    return MasterSettings(model=model_settings(args), runtime=runtime_options(args, num_slots=args.slots),
                          hub=hub, http=args.http, api_key=args.api_key, expect_workers=workers,
                          registry=args.registry, advertise=args.advertise, min_workers=args.min_workers,
                          store_root=args.store, mdns=not args.no_mdns)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", required=False,
                   help="ws://HOST:PORT of the master's hub (without it and --registry: find the master on "
                        "the LAN by mDNS, verified by the join handshake)")
    p.add_argument("--registry", default=os.environ.get("TPI_REGISTRY"),
                   help="redis://[:PASSWORD@]HOST:PORT/DB: find the master there and register this device")
    p.add_argument("--join-token", default=os.environ.get("TPI_JOIN_TOKEN"), help="the cluster's shared join token")
    p.add_argument("--insecure", action="store_true",
                   help="accept a default (change-me-...) or short (< 16 characters) join token: local demos only")
    p.add_argument("--link", default=None, help='emulate a link, e.g. "latency=5ms,bandwidth=300mbit"')
    p.add_argument("--name", default="", help="a name for logs and the cluster panel")
    p.add_argument("--rank", type=int, default=None, help="ask for this rank")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds a collective may wait")
    p.add_argument("--tls-ca", default=os.environ.get("TPI_TLS_CA"),
                   help="PEM file to trust for the master's certificate (a private CA or the master's "
                        "self-signed one); implies wss://. Without it, wss:// URLs use the system's CAs")
    p.add_argument("--once", action="store_true", help="exit when the master goes away")
    p.add_argument("--download", action="store_true",
                   help="always fetch shards from the master over HTTP, even if the store path is visible")
    p.add_argument("--mdns-interface", default=None, metavar="ADDRESS",
                   help="without --master/--registry: look for the master only on the interface with this "
                        "address (default: every interface)")


def worker_settings(args):
    from tpi.settings import WorkerSettings

    if not args.join_token:
        raise SystemExit("tpi worker: --join-token (or TPI_JOIN_TOKEN) is required")
    strong_token(args.join_token, args.insecure)
    return WorkerSettings(join_token=args.join_token, master=args.master, registry=args.registry, link=args.link,
                          name=args.name, rank=args.rank, timeout_s=args.timeout, tls_ca=args.tls_ca,
                          once=args.once, download=args.download, mdns_interface=args.mdns_interface)


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
    add_hub_args(g)  # with --transport ws
    g.add_argument("--json", action="store_true", help="print one JSON object")
    add_draft_args(g)
    add_memory_args(g)

    m = sub.add_parser("master", help="run the master: device 0, all-reduce hub, HTTP API")
    add_model_args(m)
    add_master_args(m)
    add_draft_args(m)
    add_memory_args(m)

    k = sub.add_parser("worker", help="run a worker: join a master, compute its shard")
    add_worker_args(k)

    w = sub.add_parser("webui", help="run the chat web UI, relaying to a master's HTTP API")
    w.add_argument("--master", default=os.environ.get("TPI_MASTER_URL", "http://127.0.0.1:8000"),
                   help="URL of the master's HTTP API (default $TPI_MASTER_URL or http://127.0.0.1:8000)")
    w.add_argument("--listen", default="127.0.0.1:8080",
                   help="HOST:PORT to serve the page on (default 127.0.0.1:8080; 0.0.0.0:8080 in a container)")
    w.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"),
                   help="the master's API key, if it requires one (default $TPI_API_KEY)")

    b = sub.add_parser("bench", help="benchmarks: emulated testbed, baselines, report (docs/benchmarks.md)")
    from tpi_cli.bench import add_args as add_bench_args

    add_bench_args(b)

    c = sub.add_parser("cache", help="list or prune the shard-store cache ($TPI_CACHE/stores)")
    c.add_argument("action", choices=["list", "prune"])
    c.add_argument("--max-size", default=None,
                   help="prune: keep the most recently used stores within this size (e.g. 8G; "
                        "default $TPI_STORE_CACHE_MAX or 16G); 0 deletes every store not in use")
    c.add_argument("--json", action="store_true", help="list: one JSON array")

    p = sub.add_parser("prepare", help="split a model into a shard store")
    add_model_args(p)
    p.add_argument("--out", required=True, help="directory of the shard store")
    return parser


def cmd_prepare(args) -> int:
    from tpi.engine import prepare_store
    from tpi.weights.sources import default_dtype

    m = model_settings(args)
    dtype = args.dtype or default_dtype(m.source)
    store = prepare_store(m.source, list(m.weights), dtype, args.out, max_block_bytes=m.max_block_bytes)
    total = sum(f.bytes for f in store.files.values())
    print(f"shard store at {store.root}: {store.plan.world_size} devices, {len(store.files)} files, "
          f"{total / 1e6:.1f} MB, dtype {store.dtype}")
    return 0


def cmd_cache(args) -> int:
    from tpi.weights import store_cache
    from tpi.weights.sources import cache_dir

    root = cache_dir() / "stores"
    if args.action == "prune":
        limit = store_cache.parse_size(args.max_size) if args.max_size is not None else store_cache.max_bytes()
        gone = store_cache.evict(root, limit)
        for s in gone:
            print(f"deleted {s.path} ({s.bytes / 1e6:.1f} MB)")
        print(f"{len(gone)} store(s) deleted, {sum(s.bytes for s in gone) / 1e6:.1f} MB freed")
    stores = store_cache.list_stores(root)
    if args.json:
        print(json.dumps([s.to_json() for s in stores]))
        return 0
    if args.action == "list":
        for s in stores:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.last_used))
            print(f"{s.path.name}  {s.bytes / 1e6:9.1f} MB  used {when}{'  IN USE' if s.in_use else ''}  {s.summary}")
    print(f"{len(stores)} store(s), {sum(s.bytes for s in stores) / 1e9:.2f} GB in {root} "
          f"(cap {store_cache.max_bytes() / 2**30:.1f} GiB)")
    return 0


def cmd_generate(args) -> int:
    from contextlib import nullcontext

    from tpi.engine import build_inproc_engine
    from tpi.generation.draft import attach_drafter
    from tpi.model.sampling import SamplingParams

    model, opts, draft = model_settings(args), runtime_options(args), draft_settings(args)
    if args.transport == "ws":
        from tpi.cluster.launch import LocalCluster

        context = LocalCluster(model, opts, allreduce=args.allreduce, link=args.link, wire_dtype=args.wire_dtype)
    else:
        from tpi.host import configure_torch

        configure_torch()
        context = nullcontext(build_inproc_engine(model, opts))
    with context as engine:
        try:
            attach_drafter(engine, draft, opts)
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
                      f"{result.token_latency_s * 1000:.1f} ms/token, {engine.cluster.world_size} devices, "
                      f"{result.accepted} of {result.drafted} draft tokens accepted]",
                      file=sys.stderr)
        finally:
            if args.transport != "ws":
                engine.close()
    return 0


def generation_report(engine, result, transport: str) -> dict:
    """The `--json` object: tokens, text, timings, and per device memory and time split."""
    steps = max(1, result.decode_steps)  # decode steps the breakdowns sum over
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
        "world_size": engine.cluster.world_size, "decode_steps": steps,
        "draft": getattr(engine.generator.drafter, "name", None), "draft_tokens": engine.generator.draft_tokens,
        "drafted": result.drafted, "accepted": result.accepted, "devices": devices,
    }


def cmd_master(args) -> int:
    from tpi_master.main import run

    return run(master_settings(args))


def cmd_worker(args) -> int:
    from tpi_worker.main import run

    return run(worker_settings(args))


def cmd_webui(args) -> int:
    from tpi.settings import WebUISettings
    from tpi_webui.main import run

    return run(WebUISettings(master_url=args.master, listen=args.listen, api_key=args.api_key))


def cmd_bench(args) -> int:
    from tpi_cli.bench import run

    return run(args)


COMMANDS = {"generate": cmd_generate, "prepare": cmd_prepare, "cache": cmd_cache, "master": cmd_master, "worker": cmd_worker,
            "webui": cmd_webui, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    from tpi.host import prefer_passive_wait

    prefer_passive_wait()  # before torch loads: shards (threads or processes) share the cores
    try:
        return COMMANDS[args.command](args)
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"tpi {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
