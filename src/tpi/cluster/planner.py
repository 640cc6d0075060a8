"""Plan by measured capability: device weights for `make_plan`, and a pre-flight estimate
of the time per token, broken down so the cluster status can show where it goes.

Pure functions of (model config, device capabilities, links, settings); no I/O.
Device 0 is always the master. It holds no embedding table (it reads its tokens' rows from
embed.safetensors on demand, a few KB per token, not modelled) and, like every device,
holds and scores its own slice of the vocabulary (`DeviceShard.vocab`, split in proportion
to the weights): the output head is one more block after the last layer, cut into pieces
and streamed or kept resident by the scheduler like any other.

The rule (docs/registry.md has the derivation):

  A device given a share w of every layer's work (heads, MLP columns) and of the vocabulary
  needs per token
      t_i(w) = max( w*F / speed_i ,  stream_i(w) / disk_i )
  where F is the FLOPs of all layers plus the output head (2*V*H), and
      stream_i(w) = 0                                          if w*(P*hb + KV) <= R_i
                  = (w*(P*hb + KV) + window(w) - R_i) * sb/hb   otherwise
  the bytes the sliding-window scheduler re-reads from disk each token because the slice
  does not fit: P is the parameters of all layers and the output head, hb the bytes a loaded
  parameter holds, KV the whole model's KV cache, R_i the device's budget less the
  replicated norms, and
      window(w) = window_blocks * hb * max(w*attn, min(w*mlp, cap), min(w*head, cap))
  the scheduler's window slots: attention blocks are never cut, MLP blocks and head slices
  are cut into pieces of at most cap = settings.max_block_bytes (in stored bytes). Reading
  overlaps compute (the scheduler prefetches), hence the max.

  Approximated in this continuous model (the estimate of a concrete plan below is exact):
  the window slot is the largest piece's upper bound (the runtime cuts near-equal pieces,
  so a little smaller), the scheduler's choice of which blocks to keep is taken to stream
  exactly the overflow, and file headers and page rounding are left out.

  The planner picks shares that sum to 1 and equalise t_i, i.e. minimise the slowest device's
  time (bisection on T for sum_i w_i(T) = 1, with w_i(T) the largest share device i finishes
  in T, itself found by bisection: t_i is non-decreasing in w). When every slice fits its
  budget this is work in proportion to measured GFLOP/s. A device whose proportional slice
  would not fit becomes slower by its disk rate past the point where it stops fitting, so
  work shifts away from it to devices with room; only when no device has room does the
  remainder stream, from the devices whose disks are fastest. A share is capped where the
  KV cache plus the streaming window alone fill the budget; if the caps sum to less than 1
  the model cannot run on this cluster and PlanError says so.

  Heads are whole, so the plan make_plan cuts from these shares can give a device a little
  more than its share. `plan_cluster` estimates the concrete plan, then repeatedly moves
  weight off its slowest device (x0.9, 12 rounds) and keeps the plan with the lowest
  estimated time per token.

  The estimate of a concrete plan (`estimate`) builds each device's pieces as the splitter
  cuts them (`tpi.weights.slicing.block_pieces`), costs each as the scheduler does (its file,
  header included, rounded up to whole pages, plus dtype conversions; the header is
  estimated, within tens of bytes) and asks the scheduler's own `plan_retention` which
  pieces it would stream under the budget less the KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tpi.cluster.capability import DeviceCapability
from tpi.cluster.estimate import (Estimate, Link, PlannerSettings, attn_flops, attn_params,
                                  check_devices, estimate, head_flops, kv_bytes, mlp_flops, mlp_params)
from tpi.config import ModelConfig
from tpi.plan import PlanError, ShardPlan, make_plan
from tpi.weights.slicing import ELEMENT_BYTES

REPAIR_ROUNDS, REPAIR_FACTOR = 12, 0.9  # rounding repair in plan_cluster


@dataclass(frozen=True)
class ClusterPlan:
    weights: tuple[float, ...]   # for make_plan; rank 0 is the master
    plan: ShardPlan
    estimate: Estimate


# ---------------------------------------------------------------------------------------
# The rule: equal finish times under memory budgets.

@dataclass(frozen=True)
class _Device:
    speed: float     # FLOP/s
    disk: float      # B/s
    room: float      # R_i: budget less the replicated norms, bytes


@dataclass(frozen=True)
class _Shape:
    """The continuous model's constants (whole model, i.e. at share 1), bytes as held."""

    flops: float     # F: all layers + the output head, per token
    held: float      # P*hb: every layer's weights and the whole vocabulary's head rows
    kv: float        # KV cache of all KV heads
    ratio: float     # file bytes per held byte of the above
    attn: float      # one whole attention block (never cut)
    mlp: float       # one whole MLP block
    head: float      # the whole output head
    mlp_piece: float   # the largest MLP piece the cap allows
    head_piece: float  # the largest head piece the cap allows
    window_blocks: int

    def window(self, w: float) -> float:
        """The scheduler's window at share w: window_blocks slots of the largest piece."""
        return self.window_blocks * max(w * self.attn, min(w * self.mlp, self.mlp_piece),
                                        min(w * self.head, self.head_piece))

    def feasible(self, x: _Device, w: float) -> bool:
        return w * (self.held + self.kv) <= x.room or w * self.kv + self.window(w) <= x.room

    def time(self, x: _Device, w: float) -> float:
        """t_i(w): compute, or re-reading the overflow, whichever is slower (non-decreasing in w)."""
        need = w * (self.held + self.kv)
        stream = 0.0 if need <= x.room else (need + self.window(w) - x.room) * self.ratio
        return max(w * self.flops / x.speed, stream / x.disk)

    def share(self, x: _Device, t: float = float("inf")) -> float:
        """The largest share (<= 1) device x can take and finish in t; bisection."""
        if self.feasible(x, 1.0) and self.time(x, 1.0) <= t:
            return 1.0
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if self.feasible(x, mid) and self.time(x, mid) <= t:
                lo = mid
            else:
                hi = mid
        return lo


def _shape(cfg: ModelConfig, settings: PlannerSettings) -> _Shape:
    L, H, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    D = len(cfg.dense_layers)                       # a mixture's dense layers (the rest are sparse)
    hb, sb = settings.held_bytes, settings.stored_bytes
    hhb, hsb = settings.head_held_bytes, settings.head_stored_bytes
    attn = attn_params(cfg, cfg.num_heads, cfg.num_kv_heads, False) - H  # norms excluded
    mlp = (mlp_params(cfg, cfg.intermediate_size, False) - H) * max(1, cfg.num_experts)  # every expert held
    dense = mlp_params(cfg, cfg.dense_intermediate_size, False) - H if D else 0
    cap = settings.max_block_bytes                  # stored bytes; block_pieces cuts by these
    elem, head_elem = ELEMENT_BYTES[settings.storage_dtype], ELEMENT_BYTES[settings.head_storage_dtype]
    layers = L * attn + (L - D) * mlp + D * dense
    held = layers * hb + V * H * hhb
    stored = layers * sb + V * H * hsb
    return _Shape(
        flops=L * attn_flops(cfg, cfg.num_heads, cfg.num_kv_heads, settings.context)
        + (L - D) * mlp_flops(cfg, cfg.intermediate_size) * max(1, cfg.experts_per_token)
        + D * mlp_flops(cfg, cfg.dense_intermediate_size) + head_flops(cfg),
        held=held, kv=kv_bytes(cfg, cfg.num_kv_heads, settings), ratio=stored / held,
        attn=attn * hb, mlp=max(mlp, dense) * hb, head=V * H * hhb,
        mlp_piece=cap / elem * hb, head_piece=cap / head_elem * hhb,
        window_blocks=settings.window_blocks)


def plan_weights(cfg: ModelConfig, devices: Sequence[DeviceCapability],
                 settings: PlannerSettings = PlannerSettings()) -> list[float]:
    """Relative work per device (rank 0 = the master) for `make_plan`; they sum to 1."""
    check_devices(devices, settings)
    shape = _shape(cfg, settings)
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size * settings.held_bytes  # replicated on every device
    devs = []
    for rank, d in enumerate(devices):
        room = d.mem_budget_bytes - norms
        if room <= 0:
            raise PlanError(f"device {rank}: memory budget {d.mem_budget_bytes / 2**20:.0f} MiB "
                            f"does not even hold the norms ({norms / 2**20:.0f} MiB)")
        devs.append(_Device(d.gflops * 1e9, d.disk_mbps * 1e6, room))

    caps = [shape.share(x) for x in devs]
    if sum(caps) < 1.0:
        raise PlanError(
            "the cluster's memory budgets cannot hold the KV cache and a streaming window "
            f"(need {(shape.kv + shape.window(1.0)) / 2**20:.0f} MiB in all, budgets: "
            + ", ".join(f"{d.mem_budget_bytes / 2**20:.0f}" for d in devices)
            + " MiB); add devices, raise budgets or lower max_seq")

    hi = 1e-6
    while sum(shape.share(x, hi) for x in devs) < 1.0:
        hi *= 2
        if hi > 1e9:
            raise PlanError("no finite time per token: check the devices' measured speeds")
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(shape.share(x, mid) for x in devs) >= 1.0:
            hi = mid
        else:
            lo = mid
    shares = [shape.share(x, hi) for x in devs]
    total = sum(shares)
    return [max(s / total, 1e-6) for s in shares]  # make_plan still gives each device one head


def plan_cluster(cfg: ModelConfig, devices: Sequence[DeviceCapability],
                 links: Sequence[Link | None] | None = None,
                 settings: PlannerSettings = PlannerSettings()) -> ClusterPlan:
    """Weights by the rule above, the shard plan they give, and its pre-flight estimate.
    `links[i]` is worker i's link to the master (links[0], the master's own, is ignored)."""
    if len(devices) > cfg.num_heads:
        raise PlanError(f"{len(devices)} devices but the model has only {cfg.num_heads} query heads")
    weights = plan_weights(cfg, devices, settings)
    best = None
    for _ in range(REPAIR_ROUNDS):
        plan = make_plan(cfg, weights)
        est = estimate(cfg, plan, devices, links, settings)
        if best is None or est.total_ms < best.estimate.total_ms:
            best = ClusterPlan(tuple(weights), plan, est)
        if len(devices) == 1:
            break
        slowest = max(est.devices, key=lambda e: max(e.compute_ms, e.disk_ms)).rank
        weights = [w * (REPAIR_FACTOR if r == slowest else 1.0) for r, w in enumerate(weights)]
        weights = [w / sum(weights) for w in weights]
    return best


