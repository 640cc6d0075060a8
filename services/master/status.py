"""What `GET /api/cluster` reports: the model, the plan, each device (its shard, memory in
use against its budget, link round-trip, the time split of the last forward), the
scheduler's queue, and the per-token breakdown of the last request.

The defaults are what the engine itself knows. A master that knows more (worker addresses,
measured link latency, memory budgets of remote devices) passes a `status_provider`
returning a dict that is merged over them: top-level keys replace the defaults, except
"devices", which is merged per device by "rank".
"""
from __future__ import annotations

import time
from typing import Callable

from tpi.memory import cgroup_limit_bytes, peak_rss_bytes, rss_bytes


def engine_slots(engine) -> int:
    """How many sequences the engine's KV caches hold (the batch limit)."""
    cluster = engine.cluster
    if getattr(cluster, "num_slots", None):
        return int(cluster.num_slots)
    runners = getattr(cluster, "runners", None)
    if runners:
        return int(runners[0].cache.k.shape[1])
    return 1


def _nbytes(value) -> int:
    if hasattr(value, "qweight"):  # a quantized weight: packed ints and scales
        return _nbytes(value.qweight) + _nbytes(value.scale)
    return value.numel() * value.element_size() if hasattr(value, "element_size") else 0


def runner_memory(runner) -> dict:
    """Bytes a local shard holds now, against its budget (layer weights + KV cache)."""
    blocks = getattr(runner, "blocks", None)
    kv = runner.cache.nbytes if getattr(runner, "cache", None) is not None else 0
    out = {"used_bytes": None, "budget_bytes": None, "weights_bytes": None, "kv_cache_bytes": kv}
    describe = getattr(blocks, "describe", None)
    if describe is not None:  # the sliding-window scheduler: held now, against its budget
        d = describe()
        out.update(weights_bytes=d.get("held_bytes"), weights_high_water_bytes=d.get("high_water_bytes"),
                   resident_blocks=d.get("resident_blocks"), streamed_blocks=d.get("streamed_blocks"))
        if d.get("budget_bytes") is not None:
            out["budget_bytes"] = d["budget_bytes"] + kv
    elif isinstance(getattr(blocks, "blocks", None), dict):  # everything resident
        out["weights_bytes"] = sum(_nbytes(v) for blk in blocks.blocks.values() for v in blk.values())
    if out["weights_bytes"] is not None:
        out["used_bytes"] = out["weights_bytes"] + kv
    return out


class ClusterStatus:
    def __init__(self, engine, scheduler, model_name: str,
                 provider: Callable[[], dict] | None = None):
        self.engine, self.scheduler, self.model_name, self.provider = engine, scheduler, model_name, provider
        self.started = time.time()

    def model(self) -> dict:
        cfg = self.engine.store.config
        return {"name": self.model_name, "architecture": cfg.architecture, "layers": cfg.num_layers,
                "hidden_size": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                "vocab_size": cfg.vocab_size, "context": self.engine.generator.max_seq,
                "storage_dtype": self.engine.store.dtype}

    def devices(self) -> list[dict]:
        engine = self.engine
        store = engine.store
        last = engine.cluster.breakdowns()
        runners = getattr(engine.cluster, "runners", None) or []
        out = []
        for shard in store.plan.shards:
            r = shard.rank
            stored = sum(store.file_bytes(f) for f in store.block_files(r))
            memory = runner_memory(runners[r]) if r < len(runners) else {
                "used_bytes": None, "budget_bytes": None, "weights_bytes": None, "kv_cache_bytes": None}
            memory["stored_weights_bytes"] = stored
            out.append({
                "rank": r,
                "name": "master" if r == 0 else f"device-{r}",
                "role": "master" if r == 0 else "worker",
                "state": "up",
                "address": None,
                "shard": {"q_heads": list(shard.q_heads), "kv_heads": list(shard.kv_heads),
                          "mlp_cols": list(shard.mlp_cols), "weight": store.plan.weights[r]},
                "memory": memory,
                "link": {"rtt_ms": None, "note": "in-process: no network link" if r else "local"},
                "last_forward": last[r].to_json() if r < len(last) else None,
            })
        return out

    def collect(self) -> dict:
        cluster = self.engine.cluster
        status = {
            "model": self.model(),
            "transport": "inproc" if type(cluster).__name__ == "InProcCluster" else type(cluster).__name__,
            "world_size": cluster.world_size,
            "plan": self.engine.store.plan.to_json(),
            "devices": self.devices(),
            "process": {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                        "cgroup_limit_bytes": cgroup_limit_bytes()},
            "scheduler": self.scheduler.snapshot(),
            "uptime_s": time.time() - self.started,
        }
        if self.provider:
            status = merge_status(status, self.provider() or {})
        return status


def merge_status(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if key == "devices" and isinstance(value, list):
            by_rank = {d.get("rank"): d for d in out.get("devices", [])}
            merged = []
            for dev in value:
                cur = dict(by_rank.pop(dev.get("rank"), {}))
                for k, v in dev.items():
                    cur[k] = {**cur[k], **v} if isinstance(v, dict) and isinstance(cur.get(k), dict) else v
                merged.append(cur)
            out["devices"] = sorted(merged + list(by_rank.values()), key=lambda d: d.get("rank", 0))
        else:
            out[key] = value
    return out
