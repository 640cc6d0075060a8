"""Per-device KV cache for the device's own KV heads, bounded by the context length.

Sequences occupy *slots* so several requests can decode together. A slot's memory is taken
when a sequence first uses it (`allocate`), not up front: a device holds the keys and values
of the sequences it has served, not of every sequence it could serve. (A master runs 4 slots
by default; reserving all of them at start took a quarter of a 1 GiB device for a cache one
request never touches: that room holds weights instead until a slot needs it, see
ShardRunner.make_room.) A slot, once allocated, stays.
"""
from __future__ import annotations

import math

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_seq: int,
                 head_dim: int, dtype: torch.dtype):
        self.max_seq, self.dtype = max_seq, dtype
        self.shape = (num_layers, num_kv_heads, max_seq, head_dim)  # one slot's keys (or values)
        self.k: list[torch.Tensor | None] = [None] * num_slots      # per slot: shape, or None until used
        self.v: list[torch.Tensor | None] = [None] * num_slots

    @property
    def slot_bytes(self) -> int:
        """Keys and values of one slot."""
        return 2 * math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def allocated(self) -> int:
        return sum(k is not None for k in self.k)

    @property
    def nbytes(self) -> int:
        return self.allocated * self.slot_bytes

    def missing(self, slots: list[int]) -> list[int]:
        """The slots among `slots` that hold no memory yet."""
        return sorted({s for s in slots if self.k[s] is None})

    def allocate(self, slots: list[int]) -> None:
        for s in self.missing(slots):
            self.k[s] = torch.zeros(self.shape, dtype=self.dtype)   # (layers, kv_heads, max_seq, hd)
            self.v[s] = torch.zeros(self.shape, dtype=self.dtype)

    def keys(self, slot: int) -> torch.Tensor:
        """Every cached key of one slot (layers, kv_heads, max_seq, hd)."""
        return self.k[slot]

    def write(self, layer: int, slots: list[int], starts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (B, kv_heads, T, hd) for rows placed at positions starts[b] .. starts[b]+T-1."""
        T = k.shape[2]
        for b, (slot, start) in enumerate(zip(slots, starts)):
            if start + T > self.max_seq:
                raise ValueError(f"context overflow: position {start + T} > {self.max_seq}")
            if self.k[slot] is None:
                raise RuntimeError(f"KV slot {slot} was never allocated (ShardRunner.make_room first)")
            self.k[slot][layer, :, start : start + T] = k[b]
            self.v[slot][layer, :, start : start + T] = v[b]

    def read(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, kv_heads, length, hd); a view when B == 1."""
        if len(slots) == 1:
            s = slots[0]
            return self.k[s][None, layer, :, :length], self.v[s][None, layer, :, :length]
        return (torch.stack([self.k[s][layer, :, :length] for s in slots]),
                torch.stack([self.v[s][layer, :, :length] for s in slots]))
