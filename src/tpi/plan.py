"""The shard plan: which attention heads, MLP columns and output-head rows (token ids) each
device computes.

A pure function of (model config, device weights). Uneven splits are first-class:
SmolLM2 has 9 query heads and 3 KV heads, so 2, 4 or 5 devices get unequal head counts
and a KV head needed by query heads on two devices is replicated on both.

Naming (Megatron/vLLM convention): q/k/v and gate/up are *column-parallel* (each device
holds some output rows of the weight, no communication); o_proj and down_proj are
*row-parallel* (each device holds the matching input columns and produces a partial sum
that the all-reduce adds up). A row-parallel bias is added by device 0 only.

Mixture of experts (expert parallelism): attention is split as above; whole experts go to
devices in proportion to their weights (`experts`, uneven counts; every device its own
range), each device holding all of their columns (`mlp_cols` = the whole expert). With more
devices than experts, each expert goes to a group of devices (groups as equal in size as
possible) that split its columns by weight: then every device holds one expert's
`mlp_cols`. The router is replicated. Either way a device's expert outputs are a partial sum
of the MLP output, added by the same all-reduce a dense MLP uses. The dense MLP layers of a
mixture of experts (Qwen3-MoE's mlp_only_layers) are split by columns as in a dense model
(`dense_cols`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from tpi.config import ModelConfig

# MLP column ranges start on multiples of this (when the size allows), so int4 groups
# and SIMD-friendly widths never straddle two devices.
MLP_ALIGN = 64


class PlanError(ValueError):
    """The requested split cannot be made for this model."""


@dataclass(frozen=True)
class DeviceShard:
    rank: int
    q_heads: tuple[int, int]      # [start, end) global query heads
    kv_heads: tuple[int, int]     # [start, end) global KV heads these query heads read
    mlp_cols: tuple[int, int]     # [start, end) columns of the intermediate dimension
    adds_row_bias: bool           # device 0 adds the biases of row-parallel layers
    vocab: tuple[int, int] = (0, 0)  # [start, end) token ids whose output-head rows it scores
    experts: tuple[int, int] = (0, 0)  # [start, end) experts it holds (columns mlp_cols of each)
    dense_cols: tuple[int, int] = (0, 0)  # [start, end) columns of a mixture's dense MLP layers

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def mlp_width(self) -> int:
        return self.mlp_cols[1] - self.mlp_cols[0]

    @property
    def dense_width(self) -> int:
        return self.dense_cols[1] - self.dense_cols[0]

    @property
    def num_experts(self) -> int:
        return self.experts[1] - self.experts[0]

    def holds_expert(self, expert: int) -> bool:
        return self.experts[0] <= expert < self.experts[1]

    @property
    def vocab_size(self) -> int:
        return self.vocab[1] - self.vocab[0]


@dataclass(frozen=True)
class ShardPlan:
    weights: tuple[float, ...]
    shards: tuple[DeviceShard, ...]

    @property
    def world_size(self) -> int:
        return len(self.shards)

    def to_json(self) -> dict:
        return {"weights": list(self.weights), "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_json(cls, data: dict) -> "ShardPlan":
        shards = tuple(
            DeviceShard(
                rank=s["rank"],
                q_heads=tuple(s["q_heads"]),
                kv_heads=tuple(s["kv_heads"]),
                mlp_cols=tuple(s["mlp_cols"]),
                adds_row_bias=s["adds_row_bias"],
                vocab=tuple(s["vocab"]),
                experts=tuple(s.get("experts", (0, 0))),
                dense_cols=tuple(s.get("dense_cols", (0, 0))),
            )
            for s in data["shards"]
        )
        return cls(weights=tuple(data["weights"]), shards=shards)


def make_plan(cfg: ModelConfig, weights: list[float] | tuple[float, ...]) -> ShardPlan:
    """Split heads, MLP columns and the vocabulary in proportion to `weights` (one per device)."""
    n = len(weights)
    if n < 1:
        raise PlanError("need at least one device")
    if any(w <= 0 for w in weights):
        raise PlanError(f"device weights must be positive, got {list(weights)}")
    if n > cfg.num_heads:
        raise PlanError(
            f"{n} devices but the model has only {cfg.num_heads} query heads: "
            f"every device needs at least one head (use at most {cfg.num_heads} devices)"
        )
    head_counts = proportional_split(cfg.num_heads, weights, unit=1)
    if cfg.is_moe:
        experts, mlp_cols = expert_placement(cfg, weights)
    else:
        mlp_cols = _column_ranges(cfg.intermediate_size, weights)
        experts = [(0, 0)] * n
    dense = _column_ranges(cfg.dense_intermediate_size, weights) if cfg.dense_layers else [(0, 0)] * n
    if cfg.vocab_size >= 1 << 24:
        # token ids travel as float32 in the output head's top-k exchange (exact below 2^24)
        raise PlanError(f"a vocabulary of {cfg.vocab_size} tokens is too large (at most {1 << 24})")
    vocab_counts = proportional_split(cfg.vocab_size, weights, unit=1)
    shards = []
    heads, vocab = _ranges(head_counts), _ranges(vocab_counts)
    for rank in range(n):
        h0, h1 = heads[rank]
        kv0 = h0 // cfg.group_size
        kv1 = (h1 - 1) // cfg.group_size + 1
        shards.append(DeviceShard(rank, (h0, h1), (kv0, kv1), mlp_cols[rank], adds_row_bias=rank == 0,
                                  vocab=vocab[rank], experts=experts[rank], dense_cols=dense[rank]))
    return ShardPlan(tuple(float(w) for w in weights), tuple(shards))


def expert_placement(cfg: ModelConfig, weights) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per device: its [start, end) experts and the [start, end) columns of each it holds."""
    n, E, width = len(weights), cfg.num_experts, cfg.intermediate_size
    if n <= E:  # whole experts, counts in proportion to the weights
        return _ranges(proportional_split(E, weights)), [(0, width)] * n
    experts, cols = [], []
    for e, (d0, d1) in enumerate(_ranges(proportional_split(n, [1.0] * E))):  # expert e's devices
        group = weights[d0:d1]
        experts += [(e, e + 1)] * len(group)
        cols += _column_ranges(width, group)
    return experts, cols


def _column_ranges(width: int, weights) -> list[tuple[int, int]]:
    """[0, width) MLP columns split by weights, on multiples of MLP_ALIGN when the width allows."""
    unit = MLP_ALIGN if width >= MLP_ALIGN * len(weights) else 1
    return _ranges(proportional_split(width, weights, unit=unit))


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of these sizes from 0."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def proportional_split(total: int, weights, unit: int = 1) -> list[int]:
    """Split `total` into len(weights) positive multiples of `unit` (the last may take a
    remainder) proportional to weights, by largest remainder. Every part gets >= 1 unit."""
    n = len(weights)
    units, rest = divmod(total, unit)
    if units < n:
        raise PlanError(f"cannot give {n} devices at least {unit} of {total}")
    wsum = float(sum(weights))
    ideal = [units * w / wsum for w in weights]
    counts = [max(1, int(x)) for x in ideal]
    # Hand out (or take back) units by largest (smallest) remainder until the sum is right.
    while sum(counts) < units:
        i = max(range(n), key=lambda k: ideal[k] - counts[k])
        counts[i] += 1
    while sum(counts) > units:
        i = max((k for k in range(n) if counts[k] > 1), key=lambda k: counts[k] - ideal[k])
        counts[i] -= 1
    parts = [c * unit for c in counts]
    parts[-1] += rest
    return parts


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise PlanError(f"--weights must be comma-separated numbers, got {text!r}") from e
    if not weights:
        raise PlanError("--weights is empty")
    return weights
