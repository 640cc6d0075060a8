"""Plan by measured capability: device weights for `make_plan`, and a pre-flight estimate
of the time per token, broken down so the cluster status can show where it goes.

Pure functions of (model config, device capabilities, links, settings); no I/O.
Device 0 is always the master: it also runs the head (embedding, final norm, LM head).

The rule (docs/registry.md has the derivation):

  A device given a share w of every layer's work (heads and MLP columns) needs per token
      t_i(w) = max( w*F / speed_i ,  stream_i(w) / disk_i )
  where F is the FLOPs of all layers and
      stream_i(w) = max(0, w*A - R_i) * storage_bytes / held_bytes
  the bytes the sliding-window scheduler re-reads from disk each token because the slice
  does not fit: A is the memory one share needs (its blocks as the scheduler holds them,
  a window of `window_blocks` blocks for streaming, and the KV cache) and R_i the device's
  budget less what it holds besides (norms, and on the master the head). Reading overlaps compute
  (the scheduler prefetches), hence the max. The master's head runs after the last layer,
  while the workers wait, so it adds to the token time but not to the master's share.

  The planner picks shares that sum to 1 and equalise t_i, i.e. minimise the slowest device's
  time (bisection on T for sum_i w_i(T) = 1, with w_i(T) the largest share device i finishes
  in T). When every slice fits its budget this is work in proportion to measured GFLOP/s.
  A device whose proportional slice would not fit becomes slower by its disk rate past the
  point where it stops fitting, so work shifts away from it to devices with room; only when
  no device has room does the remainder stream, from the devices whose disks are fastest.
  A share is capped where the KV cache plus the streaming window alone fill the budget; if
  the caps sum to less than 1 the model cannot run on this cluster and PlanError says so.

  Heads are whole, so the plan make_plan cuts from these shares can give a device a little
  more than its share. `plan_cluster` estimates the concrete plan, then repeatedly moves
  weight off its slowest device (x0.9, 12 rounds) and keeps the plan with the lowest
  estimated time per token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from tpi.capability import DeviceCapability
from tpi.config import ModelConfig
from tpi.plan import DeviceShard, PlanError, ShardPlan, make_plan

# Bytes per parameter in a shard file (int4: 4 bits + a float16 scale and min per 32; int8:
# 1 byte, but q, k, v and down stay bfloat16, 41-47% of a Llama's projections: ~1.5).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1.5, "int4": 0.625}
# What a loaded quantized parameter adds in a 16-bit compute dtype (int4: repacked for the
# kernel, 0.5, plus scale and zero in the compute dtype per 32, 0.125); in float32 compute
# every weight is dequantized to float32 at load (tpi.weights.quant.kernel_form).
KERNEL_COPY_BYTES = {"int8": 0, "int4": 0.625}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
FRAME_OVERHEAD_BYTES = 64  # a wire frame's header and JSON around one all-reduce tensor
ALL_REDUCES_PER_LAYER = 2  # after attention (o_proj) and after the MLP (down_proj)


def all_reduces_per_token(layers: int) -> int:
    """Two per layer, plus the one that merges the vocabulary-split head's top-k candidates."""
    return layers * ALL_REDUCES_PER_LAYER + 1
HOPS_PER_ALL_REDUCE = 2    # star: worker -> master with the partial sum, master -> worker with the total
REPAIR_ROUNDS, REPAIR_FACTOR = 12, 0.9  # rounding repair in plan_cluster


@dataclass(frozen=True)
class Link:
    """The measured link between one worker and the master."""

    rtt_s: float              # round-trip time of a small message
    bandwidth_bytes_s: float  # one direction


@dataclass(frozen=True)
class PlannerSettings:
    """Match the runtime's options (tpi.engine.RuntimeOptions, the scheduler's --window)."""

    storage_dtype: str = "bfloat16"   # dtype of the shard files (what streaming reads)
    compute_dtype: str = "float32"    # dtype of compute and of the KV cache
    wire_dtype: str = "float32"       # dtype of the all-reduce tensors
    max_seq: int = 2048               # KV cache length per slot
    num_slots: int = 1                # sequences decoding together (KV cache rows)
    context: int = 256                # tokens of context the estimate assumes for attention
    window_blocks: int = 2            # blocks the scheduler holds while streaming (in use + being read)
    kv_dtype: str | None = None       # dtype of the KV cache (default: the compute dtype)

    @property
    def held_bytes(self) -> float:
        """Bytes per parameter of a loaded block, as the scheduler counts them: the file's
        bytes plus a converted copy when a float storage dtype differs from the compute dtype,
        or a quantized one is dequantized (float32 compute) or repacked (int4)."""
        sb = DTYPE_BYTES[self.storage_dtype]
        if self.storage_dtype not in FLOAT_DTYPES:
            if self.compute_dtype == "float32":
                return sb + 4
            return sb + KERNEL_COPY_BYTES[self.storage_dtype]
        converts = self.storage_dtype != self.compute_dtype
        return sb + (DTYPE_BYTES[self.compute_dtype] if converts else 0)


@dataclass(frozen=True)
class DeviceEstimate:
    rank: int
    share: float                 # the weight given to make_plan, normalised to sum 1
    q_heads: int
    kv_heads: int
    mlp_cols: int
    gflops: float
    compute_ms: float            # its layers' FLOPs / its GFLOP/s (the master's excludes the head)
    resident_bytes: int          # weights + KV cache + head it holds in memory
    budget_bytes: int
    streamed_bytes: int          # re-read from disk per token (0 when its slice fits)
    disk_ms: float
    fits: bool                   # the whole slice stays resident
    feasible: bool               # the KV cache and the streaming window fit at all


@dataclass(frozen=True)
class Estimate:
    """Pre-flight time per generated token (decode, one sequence), in milliseconds."""

    total_ms: float
    compute_ms: float            # per layer, the slowest device's attention + MLP, summed over layers
    disk_ms: float               # the slowest device's streaming (overlapped with compute)
    head_ms: float               # embedding + LM head on the master
    latency_ms: float            # 2 all-reduces/layer x 2 hops x one-way delay of the slowest link
    transfer_ms: float           # the same hops' bytes through the master's port
    bottleneck: str              # the largest of compute/disk/head/latency/transfer
    devices: tuple[DeviceEstimate, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClusterPlan:
    weights: tuple[float, ...]   # for make_plan; rank 0 is the master
    plan: ShardPlan
    estimate: Estimate


# ---------------------------------------------------------------------------------------
# Model arithmetic: parameters and FLOPs of one device's slice, per layer.

def _attn_params(cfg: ModelConfig, nq: int, nkv: int, row_bias: bool) -> int:
    H, hd = cfg.hidden_size, cfg.head_dim
    p = H + H * nq * hd + 2 * H * nkv * hd + nq * hd * H      # norm, q, k, v, o
    if cfg.attention_bias:
        p += nq * hd + 2 * nkv * hd
    if cfg.o_bias and row_bias:
        p += H
    return p


def _mlp_params(cfg: ModelConfig, cols: int, row_bias: bool) -> int:
    H = cfg.hidden_size
    p = H + 3 * H * cols                                       # norm, gate, up, down
    if cfg.mlp_bias:
        p += 2 * cols + (H if row_bias else 0)
    return p


def _attn_flops(cfg: ModelConfig, nq: int, nkv: int, context: int) -> float:
    H, hd = cfg.hidden_size, cfg.head_dim
    return 2.0 * (H * nq * hd + 2 * H * nkv * hd + nq * hd * H) + 4.0 * nq * hd * context


def _mlp_flops(cfg: ModelConfig, cols: int) -> float:
    return 6.0 * cfg.hidden_size * cols


def _head_params(cfg: ModelConfig) -> int:
    lm = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return cfg.vocab_size * cfg.hidden_size + cfg.hidden_size + lm


def _head_flops(cfg: ModelConfig) -> float:
    return 2.0 * cfg.vocab_size * cfg.hidden_size


def _kv_bytes(cfg: ModelConfig, nkv: float, s: PlannerSettings) -> float:
    kv = DTYPE_BYTES[s.kv_dtype or s.compute_dtype]
    return 2.0 * cfg.num_layers * s.num_slots * nkv * s.max_seq * cfg.head_dim * kv


def _check(devices: Sequence[DeviceCapability], settings: PlannerSettings) -> None:
    if not devices:
        raise PlanError("no devices to plan for")
    if settings.storage_dtype not in DTYPE_BYTES:
        raise PlanError(f"unknown storage dtype {settings.storage_dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    for name in (settings.compute_dtype, settings.wire_dtype, settings.kv_dtype or settings.compute_dtype):
        if name not in FLOAT_DTYPES:
            raise PlanError(f"unknown dtype {name!r}; choose from {', '.join(FLOAT_DTYPES)}")
    for rank, d in enumerate(devices):
        if d.gflops <= 0 or d.disk_mbps <= 0:
            raise PlanError(f"device {rank} has no measured speed (gflops={d.gflops}, disk_mbps={d.disk_mbps})")


# ---------------------------------------------------------------------------------------
# The rule: equal finish times under memory budgets.

@dataclass(frozen=True)
class _Device:
    speed: float     # FLOP/s
    disk: float      # B/s
    room: float      # R_i: budget less the fixed memory, bytes
    cap: float       # largest share whose KV cache + streaming window fit


def plan_weights(cfg: ModelConfig, devices: Sequence[DeviceCapability],
                 settings: PlannerSettings = PlannerSettings()) -> list[float]:
    """Relative work per device (rank 0 = the master) for `make_plan`; they sum to 1."""
    _check(devices, settings)
    L, hb, sb = cfg.num_layers, settings.held_bytes, DTYPE_BYTES[settings.storage_dtype]
    cb = DTYPE_BYTES[settings.compute_dtype]
    full_attn = _attn_params(cfg, cfg.num_heads, cfg.num_kv_heads, False) - cfg.hidden_size
    full_mlp = _mlp_params(cfg, cfg.intermediate_size, False) - cfg.hidden_size
    P = L * (full_attn + full_mlp)                             # layer parameters, norms excluded
    F = L * (_attn_flops(cfg, cfg.num_heads, cfg.num_kv_heads, settings.context)
             + _mlp_flops(cfg, cfg.intermediate_size))
    KV = _kv_bytes(cfg, cfg.num_kv_heads, settings)
    window = settings.window_blocks * max(full_attn, full_mlp) * hb  # the largest blocks, whole model
    A = P * hb + window + KV                                   # memory one whole share needs while streaming
    ratio = sb / hb                                            # streamed file bytes per held byte

    devs = []
    for rank, d in enumerate(devices):
        fixed_mem = 2 * L * cfg.hidden_size * hb               # the replicated norms
        if rank == 0:
            fixed_mem += _head_params(cfg) * cb
        room = d.mem_budget_bytes - fixed_mem
        if room <= 0:
            what = "the head and norms" if rank == 0 else "the norms"
            raise PlanError(f"device {rank}: memory budget {d.mem_budget_bytes / 2**20:.0f} MiB "
                            f"does not even hold {what} ({fixed_mem / 2**20:.0f} MiB)")
        devs.append(_Device(d.gflops * 1e9, d.disk_mbps * 1e6, room, min(1.0, room / (window + KV))))

    if sum(x.cap for x in devs) < 1.0:
        raise PlanError(
            "the cluster's memory budgets cannot hold the KV cache and a streaming window "
            f"(need {(window + KV) / 2**20:.0f} MiB in all, budgets: "
            + ", ".join(f"{d.mem_budget_bytes / 2**20:.0f}" for d in devices)
            + " MiB); add devices, raise budgets or lower max_seq")

    def share(x: _Device, t: float) -> float:
        compute = t * x.speed / F
        if compute * A <= x.room:                              # fits: compute bound
            return min(x.cap, compute)
        disk = (x.room + t * x.disk / ratio) / A               # stream(w)/disk <= t
        return min(x.cap, compute, disk)

    hi = 1e-6
    while sum(share(x, hi) for x in devs) < 1.0:
        hi *= 2
        if hi > 1e9:
            raise PlanError("no finite time per token: check the devices' measured speeds")
    lo = 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(share(x, mid) for x in devs) >= 1.0:
            hi = mid
        else:
            lo = mid
    shares = [share(x, hi) for x in devs]
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


# ---------------------------------------------------------------------------------------
# The pre-flight estimate of one concrete plan.

def estimate(cfg: ModelConfig, plan: ShardPlan, devices: Sequence[DeviceCapability],
             links: Sequence[Link | None] | None = None,
             settings: PlannerSettings = PlannerSettings()) -> Estimate:
    """ms per token for `plan` on `devices`:
        total = head + max(compute, disk) + latency + transfer
        compute  = sum over layers of (slowest attention + slowest MLP): each all-reduce waits
        disk     = max_i streamed_bytes_i / disk_i, overlapped with compute by prefetching
        latency  = layers x 2 all-reduces x 2 hops x max_i rtt_i / 2
        transfer = layers x 2 all-reduces x 2 hops x sum_i frame_bytes / bandwidth_i
                   (the master's port carries every worker's frame in turn)
    """
    _check(devices, settings)
    if len(devices) != plan.world_size:
        raise PlanError(f"plan has {plan.world_size} devices, {len(devices)} capabilities given")
    notes: list[str] = []
    per: list[DeviceEstimate] = []
    attn_ms: list[float] = []
    mlp_ms: list[float] = []
    for shard, d in zip(plan.shards, devices):
        e, a_ms, m_ms = _device_estimate(cfg, shard, d, plan.weights, settings)
        per.append(e)
        attn_ms.append(a_ms)
        mlp_ms.append(m_ms)
        if not e.feasible:
            notes.append(f"device {shard.rank}: budget cannot hold its KV cache and streaming window")
        elif not e.fits:
            notes.append(f"device {shard.rank}: slice exceeds budget, streams "
                         f"{e.streamed_bytes / 1e6:.1f} MB/token from disk")
    L = cfg.num_layers
    compute_ms = L * (max(attn_ms) + max(mlp_ms))
    disk_ms = max(e.disk_ms for e in per)
    head_ms = _head_flops(cfg) / (devices[0].gflops * 1e9) * 1e3
    hops = all_reduces_per_token(L) * HOPS_PER_ALL_REDUCE
    worker_links = list(links or [None])[1:]
    worker_links += [None] * (len(devices) - 1 - len(worker_links))
    if len(devices) > 1 and any(x is None for x in worker_links):
        notes.append("some links are not measured: their latency and transfer count as 0")
    known = [x for x in worker_links if x is not None]
    frame = cfg.hidden_size * DTYPE_BYTES[settings.wire_dtype] + FRAME_OVERHEAD_BYTES
    latency_ms = hops * max((x.rtt_s / 2 for x in known), default=0.0) * 1e3
    transfer_ms = hops * sum(frame / x.bandwidth_bytes_s for x in known) * 1e3
    parts = {"compute": compute_ms, "disk": disk_ms, "head": head_ms,
             "latency": latency_ms, "transfer": transfer_ms}
    total = head_ms + max(compute_ms, disk_ms) + latency_ms + transfer_ms
    return Estimate(total_ms=total, compute_ms=compute_ms, disk_ms=disk_ms, head_ms=head_ms,
                    latency_ms=latency_ms, transfer_ms=transfer_ms,
                    bottleneck=max(parts, key=parts.get), devices=tuple(per), notes=tuple(notes))


def _device_estimate(cfg: ModelConfig, shard: DeviceShard, d: DeviceCapability, weights, settings: PlannerSettings):
    L, hb, sb = cfg.num_layers, settings.held_bytes, DTYPE_BYTES[settings.storage_dtype]
    cb = DTYPE_BYTES[settings.compute_dtype]
    nq, nkv, cols = shard.num_q_heads, shard.num_kv_heads, shard.mlp_width
    attn_p = _attn_params(cfg, nq, nkv, shard.adds_row_bias)
    mlp_p = _mlp_params(cfg, cols, shard.adds_row_bias)
    speed = d.gflops * 1e9
    a_ms = _attn_flops(cfg, nq, nkv, settings.context) / speed * 1e3
    m_ms = _mlp_flops(cfg, cols) / speed * 1e3
    weights_bytes = L * (attn_p + mlp_p) * hb
    fixed = int(_kv_bytes(cfg, nkv, settings)) + (_head_params(cfg) * cb if shard.rank == 0 else 0)
    room = d.mem_budget_bytes - fixed
    fits = weights_bytes <= room
    window = settings.window_blocks * max(attn_p, mlp_p) * hb
    feasible = fits or room >= window
    streamed = 0
    if not fits:
        resident_weights = max(0, room - window)
        streamed = int((weights_bytes - resident_weights) / hb * sb)
    disk_ms = streamed / (d.disk_mbps * 1e6) * 1e3
    share = weights[shard.rank] / sum(weights)
    e = DeviceEstimate(rank=shard.rank, share=share, q_heads=nq, kv_heads=nkv, mlp_cols=cols,
                       gflops=d.gflops, compute_ms=L * (a_ms + m_ms),
                       resident_bytes=int(fixed + min(weights_bytes, max(room, 0))),
                       budget_bytes=d.mem_budget_bytes, streamed_bytes=streamed, disk_ms=disk_ms,
                       fits=fits, feasible=feasible)
    return e, a_ms, m_ms
