"""Where a shard's layer weights come from: a `BlockSource` hands out one block
(a dict of tensors: the attention or the MLP part of one layer) at a time.

`ResidentBlocks` holds them all in memory; the sliding-window scheduler in
`tpi.weights.scheduler` streams them from the shard store under a memory budget.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

Block = dict[str, torch.Tensor]


class BlockSource(ABC):
    @abstractmethod
    def get(self, layer: int, kind: str) -> Block:
        """The block ('attn' or 'mlp') of `layer`; may wait for it to be loaded."""

    def release(self, layer: int, kind: str) -> None:
        """The engine is done with this block for this step."""

    def close(self) -> None:
        pass


class ResidentBlocks(BlockSource):
    def __init__(self, blocks: dict[tuple[int, str], Block]):
        self.blocks = blocks

    def get(self, layer: int, kind: str) -> Block:
        return self.blocks[(layer, kind)]
