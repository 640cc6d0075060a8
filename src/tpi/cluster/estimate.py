"""The cost model of a concrete shard plan on measured devices: per device its compute, the
bytes its memory scheduler would stream under its budget, and the all-reduce latency and
transfer per token (`estimate`), plus the constants and settings it rests on. The planner
(tpi.cluster.planner) searches device weights with it. Pure functions; no I/O.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from tpi.cluster.capability import DeviceCapability
from tpi.config import ModelConfig
from tpi.plan import DeviceShard, PlanError, ShardPlan
from tpi.weights.budget import MemoryBudgetError
from tpi.weights.gguf_kernels import gguf_form
from tpi.weights.retention import plan_with_experts
from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES, DENSE_KIND, block_pieces
from tpi.weights.store import aligned_bytes, execution_order

# Bytes per parameter in a shard file (int4: 4 bits + a float16 scale and min per 32; int8:
# 1 byte, but q, k, v and down stay bfloat16, 41-47% of a Llama's projections: ~1.5).
# gguf: what PlannerSettings.gguf_types says (GGUF_BITS below); without them Q8_0's 1.0625.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1.5, "int4": 0.625, "gguf": 1.0625}
# What a loaded quantized parameter adds in a 16-bit compute dtype (int4: repacked for the
# kernel, 0.5, plus scale and zero in the compute dtype per 32, 0.125); in float32 compute
# every weight is dequantized to float32 at load (tpi.weights.quant.kernel_form). gguf in
# float32 compute: the stored form transposed for the numba kernels (tpi.weights.gguf_exact,
# the stored bits again); in bfloat16 (or float32 without numba) the int4 kernel's form
# (tpi.weights.gguf_kernels), per type in GGUF_BITS; in float16 the forms stay as stored.
KERNEL_COPY_BYTES = {"int8": 0, "int4": 0.625, "gguf": 1.125}
# Per GGUF type, bits per weight of a gguf store's form (tpi.weights.gguf_quant) and of the
# int4 kernel's form made from it at load in bfloat16 (tpi.weights.gguf_kernels); float types are kept
# as they are (converted to the compute dtype at load when it differs).
GGUF_BITS = {"Q4_0": (4.5, 5), "Q4_1": (5, 5), "Q4_K": (4.625, 5), "Q8_0": (8.5, 9), "Q5_0": (8.5, 9),
             "Q5_1": (9, 9), "Q5_K": (8.625, 9), "Q6_K": (8.5625, 10), "F32": (32, 0), "F16": (16, 0),
             "BF16": (16, 0)}
GGUF_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# A shard file's safetensors header: 8 bytes of length, then ~64-72 bytes of JSON per tensor
# (name, dtype, shape, offsets), measured on stores the splitter writes.
HEADER_BYTES, HEADER_BYTES_PER_TENSOR = 8, 72
FRAME_OVERHEAD_BYTES = 64  # a wire frame's header and JSON around one all-reduce tensor
ALL_REDUCES_PER_LAYER = 2  # after attention (o_proj) and after the MLP (down_proj)


def all_reduces_per_token(layers: int) -> int:
    """Two per layer, plus the one that merges the vocabulary-split head's top-k candidates
    (on the ring and gloo; the star gathers them instead: star_hops_per_token)."""
    return layers * ALL_REDUCES_PER_LAYER + 1
HOPS_PER_ALL_REDUCE = 2    # star: worker -> master with the partial sum, master -> worker with the total


def star_hops_per_token(layers: int) -> int:
    """Star hops of one token: two per all-reduce, and one for the head's candidates (a
    gather: workers -> master, nothing back)."""
    return layers * ALL_REDUCES_PER_LAYER * HOPS_PER_ALL_REDUCE + 1


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
    # gguf: (part "layers" | "head", GGUF type, parameters) of the source's matrices
    # (tpi.weights.gguf_source.GGUFCheckpoint.matrix_types); empty: Q8_0's rates
    gguf_types: tuple[tuple[str, str, int], ...] = ()
    gguf_exact: bool = False          # RuntimeOptions.gguf_exact: the stored forms, no kernel copies

    def _gguf_bytes(self, part: str) -> tuple[float, float]:
        """(stored, held copy) bytes per parameter of a gguf store's matrices of `part`."""
        mine = [(t, n) for p, t, n in self.gguf_types if p == part] or [("Q8_0", 1)]
        form = gguf_form(getattr(torch, self.compute_dtype), self.gguf_exact)

        def copy_bits(t: str) -> float:
            if t in GGUF_FLOATS:
                return 0 if GGUF_FLOATS[t] == self.compute_dtype else 8 * DTYPE_BYTES[self.compute_dtype]
            return {"exact": GGUF_BITS[t][0], "kernel": GGUF_BITS[t][1], "stored": 0}[form]

        total = sum(n for _, n in mine)
        return (sum(GGUF_BITS[t][0] * n for t, n in mine) / 8 / total,
                sum(copy_bits(t) * n for t, n in mine) / 8 / total)

    @property
    def stored_bytes(self) -> float:
        """Bytes per parameter of the layers' matrices in a shard file."""
        return self._gguf_bytes("layers")[0] if self.storage_dtype == "gguf" else DTYPE_BYTES[self.storage_dtype]

    @property
    def head_stored_bytes(self) -> float:
        return self._gguf_bytes("head")[0] if self.storage_dtype == "gguf" else DTYPE_BYTES[self.head_storage_dtype]

    @property
    def held_bytes(self) -> float:
        """Bytes per parameter of a loaded block, as the scheduler counts them: the file's
        bytes plus a converted copy when a float storage dtype differs from the compute dtype,
        or a quantized one is dequantized (float32 compute) or repacked (int4)."""
        sb = DTYPE_BYTES[self.storage_dtype]
        if self.storage_dtype == "gguf":
            return sum(self._gguf_bytes("layers"))
        if self.storage_dtype not in FLOAT_DTYPES:
            if self.compute_dtype == "float32":
                return sb + 4
            return sb + KERNEL_COPY_BYTES[self.storage_dtype]
        converts = self.storage_dtype != self.compute_dtype
        return sb + (DTYPE_BYTES[self.compute_dtype] if converts else 0)

    @property
    def head_storage_dtype(self) -> str:
        """The output head stays bfloat16 in int8 / int4 stores (a gguf store keeps its type)."""
        return self.storage_dtype if self.storage_dtype in (*FLOAT_DTYPES, "gguf") else "bfloat16"

    @property
    def head_held_bytes(self) -> float:
        if self.storage_dtype == "gguf":
            return sum(self._gguf_bytes("head"))
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


# ---------------------------------------------------------------------------------------
# Model arithmetic: parameters and FLOPs of one device's slice, per layer.

def attn_params(cfg: ModelConfig, nq: int, nkv: int, row_bias: bool) -> int:
    H, hd = cfg.hidden_size, cfg.head_dim
    p = H + H * nq * hd + 2 * H * nkv * hd + nq * hd * H      # norm, q, k, v, o
    if cfg.attention_bias:
        p += nq * hd + 2 * nkv * hd
    if cfg.o_bias and row_bias:
        p += H
    return p


def mlp_params(cfg: ModelConfig, cols: int, row_bias: bool) -> int:
    H = cfg.hidden_size
    p = H + 3 * H * cols                                       # norm, gate, up, down
    if cfg.mlp_bias:
        p += 2 * cols + (H if row_bias else 0)
    return p


def attn_flops(cfg: ModelConfig, nq: int, nkv: int, context: int) -> float:
    H, hd = cfg.hidden_size, cfg.head_dim
    return 2.0 * (H * nq * hd + 2 * H * nkv * hd + nq * hd * H) + 4.0 * nq * hd * context


def mlp_flops(cfg: ModelConfig, cols: int) -> float:
    return 6.0 * cfg.hidden_size * cols


def head_flops(cfg: ModelConfig, rows: int | None = None) -> float:
    """Scoring `rows` tokens of the vocabulary (default all of it) against the hidden state."""
    return 2.0 * (cfg.vocab_size if rows is None else rows) * cfg.hidden_size


def kv_bytes(cfg: ModelConfig, nkv: float, s: PlannerSettings) -> float:
    kv = DTYPE_BYTES[s.kv_dtype or s.compute_dtype]
    return 2.0 * cfg.num_layers * s.num_slots * nkv * s.max_seq * cfg.head_dim * kv


def check_devices(devices: Sequence[DeviceCapability], settings: PlannerSettings) -> None:
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
    check_devices(devices, settings)
    if len(devices) != plan.world_size:
        raise PlanError(f"plan has {plan.world_size} devices, {len(devices)} capabilities given")
    notes: list[str] = []
    per: list[DeviceEstimate] = []
    attn_ms: list[float] = []
    mlp_ms: list[float] = []
    dense_ms: list[float] = []
    head_ms: list[float] = []
    for shard, d in zip(plan.shards, devices):
        e, a_ms, m_ms, d_ms, h_ms = _device_estimate(cfg, shard, d, plan.weights, settings)
        per.append(e)
        attn_ms.append(a_ms)
        mlp_ms.append(m_ms)
        dense_ms.append(d_ms)
        head_ms.append(h_ms)
        if not e.feasible:
            notes.append(f"device {shard.rank}: budget cannot hold its KV cache and streaming window")
        elif not e.fits:
            notes.append(f"device {shard.rank}: slice exceeds budget, streams "
                         f"{e.streamed_bytes / 1e6:.1f} MB/token from disk")
    L, D = cfg.num_layers, len(cfg.dense_layers)
    compute_ms = L * max(attn_ms) + (L - D) * max(mlp_ms) + D * max(dense_ms)
    head = max(head_ms)
    disk_ms = max(e.disk_ms for e in per)
    hops = star_hops_per_token(L)
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
    cuts them and the scheduler counts them (`tpi.weights.retention.block_costs`): the file
    rounded up to whole pages plus its dtype conversions. The header is estimated."""
    H = cfg.hidden_size
    sb, hb = settings.stored_bytes, settings.held_bytes
    hsb, hhb = settings.head_stored_bytes, settings.head_held_bytes
    row_bias = shard.adds_row_bias
    pieces = block_pieces(cfg, shard, settings.storage_dtype, settings.max_block_bytes)

    def piece(params: float, tensors: int, stored: float, held: float, extra: int = 0) -> tuple[int, int]:
        file = int(HEADER_BYTES + HEADER_BYTES_PER_TENSOR * tensors + extra + round(params * stored))
        return aligned_bytes(file) + round(params * (held - stored)), file

    out = []
    for layer, kind, p in execution_order(cfg, pieces):
        lo, hi = pieces[kind][p]
        if kind == "attn":
            # + q/k norms (hd each: Qwen3, Gemma 3), + the output norm (H: Gemma 3)
            params = attn_params(cfg, shard.num_q_heads, shard.num_kv_heads, row_bias) \
                + 2 * cfg.head_dim * cfg.qk_norm + H * cfg.sandwich_norms
            # input_norm, qkv (fused), o [, qkv_bias] [, o_bias] [, q_norm, k_norm] [, attn_out_norm]
            tensors = 3 + cfg.attention_bias + (cfg.o_bias and row_bias) + 2 * cfg.qk_norm + cfg.sandwich_norms
            out.append(piece(params, tensors, sb, hb))
        elif kind == "mlp" and cfg.is_moe:  # post_norm (H), router (E, H)
            out.append(piece(H + cfg.num_experts * H, 2, sb, hb))
        elif kind == "expert":  # gate_up (2w, H), down (H, w)
            out.append(piece(3 * H * shard.mlp_width, 2, sb, hb))
        elif kind in ("mlp", DENSE_KIND):  # a dense model's MLP, or a mixture's dense layers'
            cols, down_bias = hi - lo, cfg.mlp_bias and row_bias and p == 0  # the row bias lives in piece 0
            params = H + 3 * H * cols + (2 * cols if cfg.mlp_bias else 0) + (H if down_bias else 0) \
                + H * cfg.sandwich_norms  # Gemma 3's output norm
            # post_norm, gate_up (fused), down [, gate_up_bias] [, down_bias] [, mlp_out_norm]
            out.append(piece(params, 3 + cfg.mlp_bias + down_bias + cfg.sandwich_norms, sb, hb))
        else:  # HEAD_KIND: final_norm (H), lm_head (rows, H), rows (2,) int64
            out.append(piece(H + (hi - lo) * H, 3, hsb, hhb, extra=16))
    return [c for c, _ in out], [f for _, f in out]


def _device_estimate(cfg: ModelConfig, shard: DeviceShard, d: DeviceCapability, weights, settings: PlannerSettings):
    """One device's estimate, and its ms per layer's attention, per (sparse) layer's MLP, per
    dense layer's MLP of a mixture and for its head."""
    L, D = cfg.num_layers, len(cfg.dense_layers)
    nq, nkv, cols = shard.num_q_heads, shard.num_kv_heads, shard.mlp_width
    speed = d.gflops * 1e9
    a_ms = attn_flops(cfg, nq, nkv, settings.context) / speed * 1e3
    # a mixture of experts: per token each expert is chosen with probability k/E (uniform routing)
    chosen = shard.num_experts * cfg.experts_per_token / cfg.num_experts if cfg.is_moe else 1.0
    m_ms = mlp_flops(cfg, cols) * chosen / speed * 1e3
    d_ms = mlp_flops(cfg, shard.dense_width) / speed * 1e3  # a mixture's dense layers: every column
    h_ms = head_flops(cfg, shard.vocab_size) / speed * 1e3
    costs, files = piece_costs(cfg, shard, settings)
    kv = int(kv_bytes(cfg, nkv, settings))
    budget = d.mem_budget_bytes - kv          # what the runtime gives the scheduler (engine.build_runner)
    try:
        if budget <= 0:
            raise MemoryBudgetError("the KV cache fills the budget")
        kinds = [kind for _, kind, _ in execution_order(cfg, block_pieces(
            cfg, shard, settings.storage_dtype, settings.max_block_bytes))]
        retention = plan_with_experts(costs, [k == "expert" for k in kinds], settings.window_blocks, budget)
        streamed = sum(files[i] for i in retention.streamed) \
            + round(sum(files[i] for i in retention.on_demand) * chosen / max(1, shard.num_experts))
        held, feasible = retention.planned_bytes, True
    except MemoryBudgetError:
        streamed, held, feasible = sum(files), max(budget, 0), False  # cannot run: say what it would read
    disk_ms = streamed / (d.disk_mbps * 1e6) * 1e3
    share = weights[shard.rank] / sum(weights)
    e = DeviceEstimate(rank=shard.rank, share=share, q_heads=nq, kv_heads=nkv, mlp_cols=cols,
                       gflops=d.gflops, compute_ms=L * a_ms + (L - D) * m_ms + D * d_ms + h_ms,
                       resident_bytes=kv + held, budget_bytes=d.mem_budget_bytes,
                       streamed_bytes=streamed, disk_ms=disk_ms, fits=streamed == 0, feasible=feasible)
    return e, a_ms, m_ms, d_ms, h_ms
