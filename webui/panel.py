"""What the web UI relays of the master's GET /api/cluster: the fields its cluster panel
(static/cluster.js) shows, and nothing else.

The master keeps its status behind its API key (device addresses, the plan, registry and
process details); the web UI holds that key, and anyone who can open the page may read the
panel, so the UI publishes an allowlist rather than lend its key for the whole status."""
from __future__ import annotations

MODEL = ("name", "architecture", "layers", "context")
DEVICE = ("rank", "name", "role", "state")
MEMORY = ("used_bytes", "budget_bytes", "kv_cache_bytes", "weights_bytes", "rss_bytes", "stored_weights_bytes")
SHARD = ("q_heads", "mlp_cols")
SCHEDULER = ("slots", "active", "queue_depth")
LAST_REQUEST = ("id", "completion_tokens", "finish_reason", "ttft_s", "decode_tokens_per_s", "per_token")


def _pick(d, keys) -> dict:
    return {k: d[k] for k in keys if isinstance(d, dict) and k in d}


def _device(d: dict) -> dict:
    out = _pick(d, DEVICE)
    out["memory"] = _pick(d.get("memory"), MEMORY)
    out["link"] = _pick(d.get("link"), ("rtt_ms", "note"))
    out["shard"] = _pick(d.get("shard"), SHARD)
    return out


def panel_view(status: dict) -> dict:
    sched = status.get("scheduler") or {}
    view_sched = _pick(sched, SCHEDULER)
    if isinstance(view_sched.get("active"), list):
        view_sched["active"] = [None] * len(view_sched["active"])  # how many, not whose
    if isinstance(sched.get("last_request"), dict):
        view_sched["last_request"] = _pick(sched["last_request"], LAST_REQUEST)
    return {"model": _pick(status.get("model"), MODEL), "world_size": status.get("world_size"),
            "transport": status.get("transport"),
            "devices": [_device(d) for d in status.get("devices") or [] if isinstance(d, dict)],
            "scheduler": view_sched}
