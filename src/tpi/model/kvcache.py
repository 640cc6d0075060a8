"""Per-device KV cache for the device's own KV heads, bounded by the context length.

Sequences occupy *slots* (rows of the cache) so several requests can decode together.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_seq: int,
                 head_dim: int, dtype: torch.dtype):
        self.max_seq = max_seq
        # (layers, slots, kv_heads, max_seq, head_dim) for keys and for values
        shape = (num_layers, num_slots, num_kv_heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, slots: list[int], starts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (B, kv_heads, T, hd) for rows placed at positions starts[b] .. starts[b]+T-1."""
        T = k.shape[2]
        for b, (slot, start) in enumerate(zip(slots, starts)):
            if start + T > self.max_seq:
                raise ValueError(f"context overflow: position {start + T} > {self.max_seq}")
            self.k[layer, slot, :, start : start + T] = k[b]
            self.v[layer, slot, :, start : start + T] = v[b]

    def read(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, kv_heads, length, hd); a view when B == 1."""
        if len(slots) == 1:
            s = slots[0]
            return self.k[layer, s : s + 1, :, :length], self.v[layer, s : s + 1, :, :length]
        idx = torch.tensor(slots)
        return self.k[layer, idx, :, :length], self.v[layer, idx, :, :length]
