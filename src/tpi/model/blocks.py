"""Where a shard's weights come from: a `BlockSource` hands out one block piece at a time
(a dict of tensors: the attention, part of the MLP, or part of the output head).

Blocks are keyed (layer, kind, piece): kind "attn" or "mlp" of layers 0..L-1 (a mixture of
experts: also "expert", piece p = the device's p-th expert, and a dense layer's "dense"
instead of "mlp"; tpi.weights.slicing.layer_kinds), and "head" (the device's vocabulary slice
of the output head) as pseudo-layer L. A block bigger than the
store's cap is cut into pieces (tpi.weights.slicing); `pieces(kind)` says how many.

`ResidentBlocks` holds them all in memory; the sliding-window scheduler in
`tpi.weights.scheduler` streams them from the shard store under a memory budget.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

Block = dict[str, torch.Tensor]


class BlockSource(ABC):
    @abstractmethod
    def get(self, layer: int, kind: str, piece: int = 0) -> Block:
        """Piece `piece` of the block ('attn', 'mlp' or 'head') of `layer`; may wait for it to be loaded."""

    def release(self, layer: int, kind: str, piece: int = 0) -> None:
        """The engine is done with this piece for this step."""

    @abstractmethod
    def pieces(self, kind: str) -> int:
        """How many pieces each block of this kind is cut into."""

    def shrink(self, nbytes: int) -> None:
        """Hold `nbytes` less from now on (the KV cache needs them). A source without a budget
        has nothing to give back."""

    def close(self) -> None:
        pass

    @abstractmethod
    def describe(self) -> dict:
        """What this source holds now: held_bytes, budget_bytes (None: no budget),
        resident_blocks, streamed_blocks, and its own counters."""


class ResidentBlocks(BlockSource):
    def __init__(self, blocks: dict[tuple, Block]):
        """blocks: (layer, kind, piece) -> block; a (layer, kind) key means piece 0."""
        self.blocks = {(k if len(k) == 3 else (*k, 0)): v for k, v in blocks.items()}
        self._pieces: dict[str, int] = {}
        for _, kind, piece in self.blocks:
            self._pieces[kind] = max(self._pieces.get(kind, 0), piece + 1)

    def get(self, layer: int, kind: str, piece: int = 0) -> Block:
        return self.blocks[(layer, kind, piece)]

    def pieces(self, kind: str) -> int:
        return self._pieces.get(kind, 0)

    def describe(self) -> dict:
        held = sum(v.nbytes for blk in self.blocks.values() for v in blk.values())  # tensors or stored weights
        return {"scheduler": "off (all resident)", "held_bytes": held, "budget_bytes": None,
                "resident_blocks": len(self.blocks), "streamed_blocks": 0}
