"""Assemble a runnable model from a source: resolve, split into a shard store (cached),
open the master's embedding rows and each device's shard (layers and vocabulary slice of the
output head), and wire them to a cluster."""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tpi.cluster.base import Cluster, InProcCluster
from tpi.generation import Generator
from tpi.generation_config import GenerationConfig, load_generation_config
from tpi.model.blocks import ResidentBlocks
from tpi.model.head import head_topk
from tpi.model.shard import ShardRunner
from tpi.plan import PlanError, make_plan
from tpi.settings import ModelSettings, RuntimeOptions
from tpi.tokenizer import ChatTokenizer
from tpi.weights.checkpoint import source_config, source_fingerprint
from tpi.weights.sources import ModelSourceError, cache_dir, resolve_source
from tpi.weights.packing import pack_block
from tpi.weights.embedding import EmbeddingRows
from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES
from tpi.weights import store_cache
from tpi.weights.splitter import split_checkpoint
from tpi.weights.store import FORMAT_VERSION, MANIFEST, ShardStore

log = logging.getLogger("tpi.engine")

def prepare_store(model_src: str | None, weights: list[float], dtype: str, out: str | Path | None = None,
                  root: str | Path | None = None, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> ShardStore:
    """Resolve the model, plan over `weights`, and split into a store (reused when identical):
    at `out`, or else in a directory named by a hash of (model, plan, dtype, format, piece
    cap, every source file it copies) under `root` (default: the cache), so every plan a
    master re-plans to keeps its own store, stores of another format never share a
    directory, and an edited tokenizer makes a new store. The cache is bounded
    (tpi.weights.store_cache: least recently used stores go past its size cap).

    `model_src` may also be a store made by `tpi prepare` (a directory with a manifest): it is
    used as it is if it was prepared for this plan and dtype."""
    store = prepared_store(model_src)
    if store is not None:
        plan = make_plan(store.config, weights)
        if plan != store.plan or dtype != store.dtype:
            raise PlanError(f"{model_src} is a shard store prepared for {store.plan.world_size} device(s) with "
                            f"weights {list(store.plan.weights)}, dtype {store.dtype}; asked for {len(weights)} "
                            f"with {list(weights)}, dtype {dtype}: prepare a store for these")
        return store
    model_dir = resolve_source(model_src)
    cfg = source_config(model_dir)
    plan = make_plan(cfg, weights)
    if out is not None:
        return ShardStore(split_checkpoint(model_dir, plan, out, dtype, max_block_bytes))
    cache = Path(root or cache_dir() / "stores")
    store = ShardStore(split_checkpoint(model_dir, plan, store_dir(model_dir, plan, dtype, cache, max_block_bytes),
                                        dtype, max_block_bytes))
    store_cache.mark_used(store.root)
    for gone in store_cache.evict(cache, store_cache.max_bytes(), keep=store.root):
        log.info("store cache over its %.1f GiB cap: deleted the least recently used store %s (%.1f MB)",
                 store_cache.max_bytes() / 2**30, gone.path, gone.bytes / 1e6)
    return store


def store_dir(model_dir: Path, plan, dtype: str, root: str | Path | None, max_block_bytes: int) -> Path:
    """Where prepare_store keeps the store of (model, plan, dtype, format, piece cap, source
    files) under `root` (default: the cache)."""
    key = json.dumps([str(model_dir.resolve()), plan.to_json(), dtype, FORMAT_VERSION, max_block_bytes,
                      source_fingerprint(model_dir)], sort_keys=True)
    return Path(root or cache_dir() / "stores") / hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare_store_apart(model_src: str | None, weights: list[float], dtype: str, root: str | Path | None = None,
                        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> ShardStore:
    """prepare_store for a serving process: a complete store is opened here; splitting (and a
    hub download) run in a child process. A split reads and writes the whole model, and what
    it leaves in this process's heap would count in the RSS its memory budget is taken from
    (tpi.host.memory_budget): the budget must count what the device holds, not a finished
    split. A store directory is named by everything it is made from (`store_dir`) and its
    manifest is written last, so a manifest there means the store is complete."""
    if prepared_store(model_src) is not None:
        return prepare_store(model_src, weights, dtype)  # checks the plan and dtype
    src = Path(model_src).expanduser() if model_src else None
    if src is None or src.exists():  # the embedded default or a local file: cheap to look at
        model_dir = resolve_source(model_src)
        cfg = source_config(model_dir)
        out = store_dir(model_dir, make_plan(cfg, weights), dtype, root, max_block_bytes)
        if _cut_with(out, cfg):
            store_cache.mark_used(out)
            return ShardStore(out)
    return ShardStore(_in_child("prepare_store", model_src, list(weights), dtype, None,
                                None if root is None else str(root), max_block_bytes))


def _cut_with(out: Path, cfg) -> bool:
    """Whether `out` holds a complete store (its manifest) cut with `cfg`, the source's config
    as this code reads it. split_checkpoint's reuse rule compares the same, so a store cut
    before that reading changed (a GGUF source's stop set, say) is rebuilt in place."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("model_config") == json.loads(json.dumps(cfg.to_json()))


# Errors a child's prepare_store may raise, re-raised here by name (their messages name the cause).
_CHILD_ERRORS = {e.__name__: e for e in (PlanError, ModelSourceError, ValueError, FileNotFoundError)}


def _in_child(function: str, *args) -> str:
    """tpi.engine.`function`(*args) in a fresh Python process; returns the root of the store it gives."""
    code = ("import json, sys\n"
            "from tpi import engine\n"
            "try:\n"
            f"    out = engine.{function}(*json.loads(sys.argv[1]))\n"
            "except Exception as e:\n"
            "    print(json.dumps({'error': type(e).__name__, 'message': str(e)})); sys.exit(1)\n"
            "print(json.dumps({'path': str(out.root)}))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"preparing the shard store failed in its child process (exit {proc.returncode})") from None
    if "error" in result:
        raise _CHILD_ERRORS.get(result["error"], RuntimeError)(result["message"])
    return result["path"]


def prepared_store(model_src: str | None) -> ShardStore | None:
    """The store at `model_src` if it is one (`tpi prepare --out DIR`), else None."""
    if model_src and (Path(model_src) / MANIFEST).is_file():
        return ShardStore(model_src)
    return None


def open_embedding(store: ShardStore, compute_dtype: torch.dtype) -> EmbeddingRows:
    """The master's embedding: rows read from the store on demand, no table in memory."""
    return EmbeddingRows(store, compute_dtype)


def runner_topk(store: ShardStore, opts: RuntimeOptions) -> int:
    """K of the output head's top-k exchange: the same on every device of this plan."""
    return head_topk([s.vocab_size for s in store.plan.shards], opts.head_topk)


def kv_cache_bytes(store: ShardStore, rank: int, opts: RuntimeOptions) -> int:
    """Bytes of device `rank`'s KV cache: keys and values for every layer, slot and position."""
    cfg, shard = store.config, store.plan.shards[rank]
    elem = torch.empty((), dtype=opts.torch_kv_dtype()).element_size()
    return 2 * cfg.num_layers * opts.num_slots * shard.num_kv_heads * opts.max_seq * cfg.head_dim * elem


def load_resident_runner(store: ShardStore, rank: int, opts: RuntimeOptions) -> ShardRunner:
    """Every block in memory, loaded once (`--no-scheduler`)."""
    cdt = opts.torch_compute_dtype()
    blocks = {key: pack_block(store.load_views(store.piece_path(rank, *key)), cdt, opts.gguf_exact)[0]
              for key in store.execution_order(rank)}
    return ShardRunner(store.config, store.plan.shards[rank], ResidentBlocks(blocks),
                       compute_dtype=cdt, max_seq=opts.max_seq, num_slots=opts.num_slots,
                       kv_dtype=opts.torch_kv_dtype(), head_topk=runner_topk(store, opts))


def build_runner(store: ShardStore, rank: int, opts: RuntimeOptions, devices_in_process: int = 1) -> ShardRunner:
    """One device's runner from a shard store, as a worker process (or the in-process
    cluster) builds it: the sliding-window scheduler under the memory budget, or every
    block resident with `opts.scheduler` False.

    The budget (`opts.memory_budget`, else derived from this process's cgroup limit, shared
    by `devices_in_process`) covers the device's layer weights and its KV cache. The KV cache
    of every slot must fit beside the streaming window (checked here, so that serving never
    fails for it), but the scheduler starts with what ONE slot leaves: the other slots take
    their room from resident weights when first used (ShardRunner.make_room)."""
    from tpi.weights.budget import MemoryBudgetError, default_device_budget, format_size
    from tpi.weights.retention import block_costs, plan_with_experts
    from tpi.weights.scheduler import SlidingWindowBlocks

    if not opts.scheduler:
        return load_resident_runner(store, rank, opts)
    cdt = opts.torch_compute_dtype()
    kv = kv_cache_bytes(store, rank, opts)
    one_slot = kv // max(1, opts.num_slots)
    budget = opts.memory_budget
    if budget is None:
        budget = default_device_budget(devices_in_process)
    weights_budget = None
    if budget is not None:
        if budget - kv <= 0:
            raise MemoryBudgetError(
                f"device {rank}: the memory budget {format_size(budget)} does not even hold the KV cache "
                f"({format_size(kv)} for {opts.num_slots} slot(s) of {opts.max_seq} positions); lower --max-seq "
                f"or --slots, or use --kv-dtype bfloat16")
        kinds = [kind for _, kind, _ in store.execution_order(rank)]
        plan_with_experts(block_costs(store, rank, cdt, opts.gguf_exact), [k == "expert" for k in kinds], opts.window,
                          budget - kv)
        weights_budget = budget - one_slot
    blocks = SlidingWindowBlocks(store, rank, window=opts.window, budget_bytes=weights_budget, compute_dtype=cdt,
                                 gguf_exact=opts.gguf_exact)
    return ShardRunner(store.config, store.plan.shards[rank], blocks, compute_dtype=cdt,
                       max_seq=opts.max_seq, num_slots=opts.num_slots, kv_dtype=opts.torch_kv_dtype(),
                       head_topk=runner_topk(store, opts), kv_slots_planned=1)


def max_context(store: ShardStore, opts: RuntimeOptions) -> int:
    return min(opts.max_seq, store.config.max_position_embeddings)


@dataclass
class Engine:
    store: ShardStore
    tokenizer: ChatTokenizer
    embedder: EmbeddingRows
    cluster: Cluster
    generator: Generator
    num_slots: int = 1              # sequences its KV caches hold (the batch limit)
    generation: GenerationConfig = GenerationConfig()   # the model's sampling defaults

    def swap_cluster(self, cluster: Cluster, store: ShardStore | None = None, compute_dtype=None) -> None:
        """Serve from `cluster` from now on (called between steps, e.g. after a re-plan); with
        a new `store`, the master's embedding rows are read from it (the old one may go)."""
        self.cluster = self.generator.cluster = cluster
        if store is not None:
            self.store = store
            self.embedder = self.generator.embedder = open_embedding(store, compute_dtype)

    def close(self) -> None:
        self.cluster.close()


def build_engine(store: ShardStore, cluster: Cluster, opts: RuntimeOptions) -> Engine:
    tokenizer = ChatTokenizer(store.model_dir)
    embedder = open_embedding(store, opts.torch_compute_dtype())
    generation = load_generation_config(store.model_dir)
    stops = set(store.config.eos_token_ids) | tokenizer.stop_ids() | set(generation.eos_token_ids)
    generator = Generator(store.config, embedder, cluster, tokenizer, max_context(store, opts), stops)
    return Engine(store, tokenizer, embedder, cluster, generator, opts.num_slots, generation)


def build_inproc_engine(model: ModelSettings, opts: RuntimeOptions) -> Engine:
    """Every device of `model`'s plan as a thread of this process."""
    opts = opts.for_source(model.source)
    store = prepare_store_apart(model.source, list(model.weights), opts.dtype, max_block_bytes=model.max_block_bytes)
    opts = replace(opts, max_seq=max_context(store, opts))
    n = store.plan.world_size
    if opts.scheduler and opts.memory_budget is None:
        # One process holds every device: share what the limit leaves.
        from tpi.weights.budget import default_device_budget

        opts = replace(opts, memory_budget=default_device_budget(n))
    runners = []
    try:
        for r in range(n):
            runners.append(build_runner(store, r, opts, devices_in_process=n))
    except BaseException:
        for runner in runners:
            runner.blocks.close()
        raise
    return build_engine(store, InProcCluster(runners), opts)
