"""Per-token time breakdown of one device: compute, communication, waiting for disk; the
compute split into the layers' attention, their MLP and the output head (head[0])."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


TOTALS = ("compute_s", "comm_s", "disk_wait_s", "attention_s", "mlp_s")  # Breakdown's sums, in field order


@dataclass
class Breakdown:
    compute_s: float = 0.0
    comm_s: float = 0.0
    disk_wait_s: float = 0.0
    attention_s: float = 0.0   # the part of compute_s in the layers' attention (norm, qkv, rope, KV, o)
    mlp_s: float = 0.0         # the part in their MLP (or expert mix); the rest is the head's
    # per layer: [compute, comm, disk_wait] seconds
    layers: list[list[float]] = field(default_factory=list)
    # the output head (vocabulary slice, top-k exchange): [compute, comm, disk_wait] seconds
    head: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def add(self, other: "Breakdown") -> None:
        self.compute_s += other.compute_s
        self.comm_s += other.comm_s
        self.disk_wait_s += other.disk_wait_s
        self.attention_s += other.attention_s
        self.mlp_s += other.mlp_s
        self.head = [a + b for a, b in zip(self.head, other.head)]
        if not self.layers:
            self.layers = [list(x) for x in other.layers]
        else:
            for mine, theirs in zip(self.layers, other.layers):
                for i in range(3):
                    mine[i] += theirs[i]

    def totals(self) -> dict[str, float]:
        """The sums, as a worker's Reply carries them."""
        return {k: getattr(self, k) for k in TOTALS}

    @classmethod
    def from_reply(cls, totals: dict[str, float]) -> "Breakdown":
        """A worker's totals (any key missing counts as 0: a peer's reply is not trusted to be whole)."""
        return cls(*(float(totals.get(k, 0.0)) for k in TOTALS))

    def to_json(self, per_layer: bool = False) -> dict:
        out: dict = self.totals()
        if per_layer:
            out["layers"] = self.layers
            out["head"] = self.head
        return out


class Stopwatch:
    """Split elapsed wall time into named buckets with minimal overhead."""

    __slots__ = ("_t",)

    def __init__(self) -> None:
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt
