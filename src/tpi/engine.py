"""Assemble a runnable model from a source: resolve, split into a shard store (cached),
load the master's head and each shard, and wire them to a cluster."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.cluster import Cluster, InProcCluster
from tpi.config import load_model_config
from tpi.generate import Generator
from tpi.model.blocks import ResidentBlocks
from tpi.model.head import Head
from tpi.model.shard import ShardRunner
from tpi.plan import make_plan
from tpi.tokenizer import ChatTokenizer
from tpi.weights.sources import cache_dir, resolve_model
from tpi.weights.splitter import STORAGE_DTYPES, split_checkpoint
from tpi.weights.store import ShardStore

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RuntimeOptions:
    dtype: str = "bfloat16"             # storage dtype of the shard store
    compute_dtype: str | None = None    # default: the storage dtype (float32 for quantized)
    max_seq: int = 2048                 # context length (KV cache size)
    num_slots: int = 1                  # sequences that can decode together

    def torch_compute_dtype(self) -> torch.dtype:
        name = self.compute_dtype or (self.dtype if self.dtype in DTYPES else "float32")
        if name not in DTYPES:
            raise ValueError(f"unknown compute dtype {name!r}; choose from {', '.join(DTYPES)}")
        return DTYPES[name]


def prepare_store(model_src: str | None, weights: list[float], dtype: str, out: str | Path | None = None) -> ShardStore:
    """Resolve the model, plan over `weights`, and split into a store (reused when identical)."""
    model_dir = resolve_model(model_src)
    cfg = load_model_config(model_dir)
    plan = make_plan(cfg, weights)
    if out is None:
        key = json.dumps([str(model_dir.resolve()), plan.to_json(), dtype], sort_keys=True)
        out = cache_dir() / "stores" / hashlib.sha256(key.encode()).hexdigest()[:16]
    return ShardStore(split_checkpoint(model_dir, plan, out, dtype))


def load_head(store: ShardStore, compute_dtype: torch.dtype) -> Head:
    return Head(store.config, store.load_head(), compute_dtype)


def load_resident_runner(store: ShardStore, rank: int, opts: RuntimeOptions) -> ShardRunner:
    cdt = opts.torch_compute_dtype()
    blocks = {
        (layer, kind): {k: v.to(cdt) for k, v in store.load_block(rank, layer, kind).items()}
        for layer in range(store.config.num_layers) for kind in ("attn", "mlp")
    }
    return ShardRunner(store.config, store.plan.shards[rank], ResidentBlocks(blocks),
                       compute_dtype=cdt, max_seq=opts.max_seq, num_slots=opts.num_slots)


def max_context(store: ShardStore, opts: RuntimeOptions) -> int:
    return min(opts.max_seq, store.config.max_position_embeddings)


@dataclass
class Engine:
    store: ShardStore
    tokenizer: ChatTokenizer
    head: Head
    cluster: Cluster
    generator: Generator

    def close(self) -> None:
        self.cluster.close()


def build_engine(store: ShardStore, cluster: Cluster, opts: RuntimeOptions) -> Engine:
    tokenizer = ChatTokenizer(store.model_dir)
    head = load_head(store, opts.torch_compute_dtype())
    stops = set(store.config.eos_token_ids) | tokenizer.stop_ids()
    gen_cfg = store.model_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        stops |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    generator = Generator(store.config, head, cluster, tokenizer, max_context(store, opts), stops)
    return Engine(store, tokenizer, head, cluster, generator)


def build_inproc_engine(model_src: str | None, weights: list[float], opts: RuntimeOptions) -> Engine:
    store = prepare_store(model_src, weights, opts.dtype)
    opts = RuntimeOptions(opts.dtype, opts.compute_dtype, max_context(store, opts), opts.num_slots)
    runners = [load_resident_runner(store, r, opts) for r in range(store.plan.world_size)]
    return build_engine(store, InProcCluster(runners), opts)
