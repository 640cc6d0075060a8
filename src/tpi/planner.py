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

from dataclasses import asdict, dataclass, field
from typing import Sequence

from tpi.capability import DeviceCapability
from tpi.config import ModelConfig
from tpi.plan import DeviceShard, PlanError, ShardPlan, make_plan
from tpi.weights.scheduler import MemoryBudgetError, plan_retention
from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES, ELEMENT_BYTES, block_pieces
from tpi.weights.store import aligned_bytes, execution_order

# Bytes per parameter in a shard file (int4: 4 bits + a float16 scale and min per 32; int8:
# 1 byte, but q, k, v and down stay bfloat16, 41-47% of a Llama's projections: ~1.5).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1.5, "int4": 0.625}
# What a loaded quantized parameter adds in a 16-bit compute dtype (int4: repacked for the
# kernel, 0.5, plus scale and zero in the compute dtype per 32, 0.125); in float32 compute
# every weight is dequantized to float32 at load (tpi.weights.quant.kernel_form).
KERNEL_COPY_BYTES = {"int8": 0, "int4": 0.625}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# A shard file's safetensors header: 8 bytes of length, then ~64-72 bytes of JSON per tensor
# (name, dtype, shape, offsets), measured on stores the splitter writes.
HEADER_BYTES, HEADER_BYTES_PER_TENSOR = 8, 72
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
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES  # the store's piece cap (tpi prepare --max-block-bytes)

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

    @property
    def head_storage_dtype(self) -> str:
        """The output head stays bfloat16 in quantized stores."""
        return self.storage_dtype if self.storage_dtype in FLOAT_DTYPES else "bfloat16"

    @property
    def head_held_bytes(self) -> float:
        return PlannerSettings(self.head_storage_dtype, self.compute_dtype).held_bytes


@dataclass(frozen=True)
class DeviceEstimate:
    rank: int
    share: float                 # the weight given to make_plan, normalised to sum 1
    q_heads: int
    kv_heads: int
    mlp_cols: int
    gflops: float
    compute_ms: float            # its layers' and its vocabulary slice's FLOPs / its GFLOP/s
    resident_bytes: int          # what the scheduler plans to hold (resident pieces + window) + KV cache
    budget_bytes: int
    streamed_bytes: int          # file bytes re-read from disk per token (0 when its slice fits)
    disk_ms: float
    fits: bool                   # the whole slice stays resident
    feasible: bool               # the KV cache and the streaming window fit at all


@dataclass(frozen=True)
class Estimate:
    """Pre-flight time per generated token (decode, one sequence), in milliseconds."""

    total_ms: float
    compute_ms: float            # per layer, the slowest device's attention + MLP, summed over layers
    disk_ms: float               # the slowest device's streaming (overlapped with compute)
    head_ms: float               # the slowest device's part of the vocabulary-split output head
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


def _head_flops(cfg: ModelConfig, rows: int | None = None) -> float:
    """Scoring `rows` tokens of the vocabulary (default all of it) against the hidden state."""
    return 2.0 * (cfg.vocab_size if rows is None else rows) * cfg.hidden_size


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
    hb, sb = settings.held_bytes, DTYPE_BYTES[settings.storage_dtype]
    hhb, hsb = settings.head_held_bytes, DTYPE_BYTES[settings.head_storage_dtype]
    attn = _attn_params(cfg, cfg.num_heads, cfg.num_kv_heads, False) - H  # norms excluded
    mlp = _mlp_params(cfg, cfg.intermediate_size, False) - H
    cap = settings.max_block_bytes                  # stored bytes; block_pieces cuts by these
    elem, head_elem = ELEMENT_BYTES[settings.storage_dtype], ELEMENT_BYTES[settings.head_storage_dtype]
    held = L * (attn + mlp) * hb + V * H * hhb
    stored = L * (attn + mlp) * sb + V * H * hsb
    return _Shape(
        flops=L * (_attn_flops(cfg, cfg.num_heads, cfg.num_kv_heads, settings.context)
                   + _mlp_flops(cfg, cfg.intermediate_size)) + _head_flops(cfg),
        held=held, kv=_kv_bytes(cfg, cfg.num_kv_heads, settings), ratio=stored / held,
        attn=attn * hb, mlp=mlp * hb, head=V * H * hhb,
        mlp_piece=cap / elem * hb, head_piece=cap / head_elem * hhb,
        window_blocks=settings.window_blocks)


def plan_weights(cfg: ModelConfig, devices: Sequence[DeviceCapability],
                 settings: PlannerSettings = PlannerSettings()) -> list[float]:
    """Relative work per device (rank 0 = the master) for `make_plan`; they sum to 1."""
    _check(devices, settings)
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


# ---------------------------------------------------------------------------------------
# The pre-flight estimate of one concrete plan.

def estimate(cfg: ModelConfig, plan: ShardPlan, devices: Sequence[DeviceCapability],
             links: Sequence[Link | None] | None = None,
             settings: PlannerSettings = PlannerSettings()) -> Estimate:
    """ms per token for `plan` on `devices`:
        total = max(compute + head, disk) + latency + transfer
        compute  = sum over layers of (slowest attention + slowest MLP): each all-reduce waits
        head     = the slowest device's vocabulary slice (2 x rows x H FLOPs), then the top-k
                   all-reduce
        disk     = max_i streamed_bytes_i / disk_i, overlapped with compute by prefetching
                   (the head's pieces are streamed like the layers')
        latency  = all-reduces x 2 hops x max_i rtt_i / 2
        transfer = all-reduces x 2 hops x sum_i frame_bytes / bandwidth_i
                   (the master's port carries every worker's frame in turn)
    """
    _check(devices, settings)
    if len(devices) != plan.world_size:
        raise PlanError(f"plan has {plan.world_size} devices, {len(devices)} capabilities given")
    notes: list[str] = []
    per: list[DeviceEstimate] = []
    attn_ms: list[float] = []
    mlp_ms: list[float] = []
    head_ms: list[float] = []
    for shard, d in zip(plan.shards, devices):
        e, a_ms, m_ms, h_ms = _device_estimate(cfg, shard, d, plan.weights, settings)
        per.append(e)
        attn_ms.append(a_ms)
        mlp_ms.append(m_ms)
        head_ms.append(h_ms)
        if not e.feasible:
            notes.append(f"device {shard.rank}: budget cannot hold its KV cache and streaming window")
        elif not e.fits:
            notes.append(f"device {shard.rank}: slice exceeds budget, streams "
                         f"{e.streamed_bytes / 1e6:.1f} MB/token from disk")
    L = cfg.num_layers
    compute_ms = L * (max(attn_ms) + max(mlp_ms))
    head = max(head_ms)
    disk_ms = max(e.disk_ms for e in per)
    hops = all_reduces_per_token(L) * HOPS_PER_ALL_REDUCE
    worker_links = list(links or [None])[1:]
    worker_links += [None] * (len(devices) - 1 - len(worker_links))
    if len(devices) > 1 and any(x is None for x in worker_links):
        notes.append("some links are not measured: their latency and transfer count as 0")
    known = [x for x in worker_links if x is not None]
    frame = cfg.hidden_size * DTYPE_BYTES[settings.wire_dtype] + FRAME_OVERHEAD_BYTES
    latency_ms = hops * max((x.rtt_s / 2 for x in known), default=0.0) * 1e3
    transfer_ms = hops * sum(frame / x.bandwidth_bytes_s for x in known) * 1e3
    parts = {"compute": compute_ms, "disk": disk_ms, "head": head,
             "latency": latency_ms, "transfer": transfer_ms}
    total = max(compute_ms + head, disk_ms) + latency_ms + transfer_ms
    return Estimate(total_ms=total, compute_ms=compute_ms, disk_ms=disk_ms, head_ms=head,
                    latency_ms=latency_ms, transfer_ms=transfer_ms,
                    bottleneck=max(parts, key=parts.get), devices=tuple(per), notes=tuple(notes))


def piece_costs(cfg: ModelConfig, shard: DeviceShard, settings: PlannerSettings) -> tuple[list[int], list[int]]:
    """(cost, file bytes) of each of the device's pieces in execution order, as the splitter
    cuts them and the scheduler counts them (`tpi.weights.scheduler.block_costs`): the file
    rounded up to whole pages plus its dtype conversions. The header is estimated."""
    H = cfg.hidden_size
    sb, hb = DTYPE_BYTES[settings.storage_dtype], settings.held_bytes
    hsb, hhb = DTYPE_BYTES[settings.head_storage_dtype], settings.head_held_bytes
    row_bias = shard.adds_row_bias
    pieces = block_pieces(cfg, shard, settings.storage_dtype, settings.max_block_bytes)

    def piece(params: float, tensors: int, stored: float, held: float, extra: int = 0) -> tuple[int, int]:
        file = int(HEADER_BYTES + HEADER_BYTES_PER_TENSOR * tensors + extra + round(params * stored))
        return aligned_bytes(file) + round(params * (held - stored)), file

    out = []
    for layer, kind, p in execution_order(cfg.num_layers, pieces):
        lo, hi = pieces[kind][p]
        if kind == "attn":
            params = _attn_params(cfg, shard.num_q_heads, shard.num_kv_heads, row_bias)
            tensors = 5 + 3 * cfg.attention_bias + (cfg.o_bias and row_bias)
            out.append(piece(params, tensors, sb, hb))
        elif kind == "mlp":
            cols, down_bias = hi - lo, cfg.mlp_bias and row_bias and p == 0  # the row bias lives in piece 0
            params = H + 3 * H * cols + (2 * cols if cfg.mlp_bias else 0) + (H if down_bias else 0)
            out.append(piece(params, 4 + 2 * cfg.mlp_bias + down_bias, sb, hb))
        else:  # HEAD_KIND: final_norm (H), lm_head (rows, H), rows (2,) int64
            out.append(piece(H + (hi - lo) * H, 3, hsb, hhb, extra=16))
    return [c for c, _ in out], [f for _, f in out]


def _device_estimate(cfg: ModelConfig, shard: DeviceShard, d: DeviceCapability, weights, settings: PlannerSettings):
    """One device's estimate, and its ms per layer's attention, per layer's MLP and for its head."""
    L = cfg.num_layers
    nq, nkv, cols = shard.num_q_heads, shard.num_kv_heads, shard.mlp_width
    speed = d.gflops * 1e9
    a_ms = _attn_flops(cfg, nq, nkv, settings.context) / speed * 1e3
    m_ms = _mlp_flops(cfg, cols) / speed * 1e3
    h_ms = _head_flops(cfg, shard.vocab_size) / speed * 1e3
    costs, files = piece_costs(cfg, shard, settings)
    kv = int(_kv_bytes(cfg, nkv, settings))
    budget = d.mem_budget_bytes - kv          # what the runtime gives the scheduler (engine.build_runner)
    try:
        if budget <= 0:
            raise MemoryBudgetError("the KV cache fills the budget")
        retention = plan_retention(costs, settings.window_blocks, budget)
        streamed, held, feasible = sum(files[i] for i in retention.streamed), retention.planned_bytes, True
    except MemoryBudgetError:
        streamed, held, feasible = sum(files), max(budget, 0), False  # cannot run: say what it would read
    disk_ms = streamed / (d.disk_mbps * 1e6) * 1e3
    share = weights[shard.rank] / sum(weights)
    e = DeviceEstimate(rank=shard.rank, share=share, q_heads=nq, kv_heads=nkv, mlp_cols=cols,
                       gflops=d.gflops, compute_ms=L * (a_ms + m_ms) + h_ms,
                       resident_bytes=kv + held, budget_bytes=d.mem_budget_bytes,
                       streamed_bytes=streamed, disk_ms=disk_ms, fits=streamed == 0, feasible=feasible)
    return e, a_ms, m_ms, h_ms
