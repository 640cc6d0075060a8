"""What `GET /api/cluster` reports: the model, the plan, each device (its shard, memory in
use against its budget, link round-trip, the time split of the last forward), the
scheduler's queue, and the per-token breakdown of the last request.

Each device's entry is what the cluster reports of it (`Cluster.device_status`: memory
against budget, link, address) over what the plan says. A master that manages its cluster
(re-plans, planner estimates) passes a `status_provider` whose dict is merged over the
result: top-level keys replace, except "devices", which is merged per device by "rank".
"""
from __future__ import annotations

import time
from typing import Callable

from tpi.host import memory_limit_bytes, peak_rss_bytes, rss_bytes


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
        store, cluster = engine.store, engine.cluster
        last = cluster.breakdowns()
        reported = {d["rank"]: d for d in cluster.device_status()}
        out = []
        for shard in store.plan.shards:
            r = shard.rank
            device = {
                "rank": r, "name": "master" if r == 0 else f"device-{r}", "role": "master" if r == 0 else "worker",
                "state": "up", "address": None,
                "shard": {"q_heads": list(shard.q_heads), "kv_heads": list(shard.kv_heads),
                          "mlp_cols": list(shard.mlp_cols), "weight": store.plan.weights[r]},
                "last_forward": last[r].to_json() if r < len(last) else None,
            }
            device.update({k: v for k, v in reported.get(r, {}).items() if k != "shard"})
            device["memory"] = {**device.get("memory", {}),
                                "stored_weights_bytes": sum(store.file_bytes(f) for f in store.block_files(r))}
            out.append(device)
        return out

    def collect(self) -> dict:
        cluster = self.engine.cluster
        status = {
            "model": self.model(),
            "transport": cluster.transport,
            "world_size": cluster.world_size,
            "plan": self.engine.store.plan.to_json(),
            "devices": self.devices(),
            "process": {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                        "cgroup_limit_bytes": memory_limit_bytes()},
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
