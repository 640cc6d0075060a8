"""One device's shard of the transformer layers and of the output head.

Each layer: attention over the device's query heads, then an explicit all-reduce of the
row-parallel partial sum; then the device's MLP columns (summed over the block's pieces on
the device) or, in a mixture of experts' sparse layer, its share of the experts, then
another all-reduce. After the last layer (`step`): the device's
vocabulary slice of the output head, its top K, and one all-reduce that merges every
device's candidates (tpi.model.head).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tpi.comm.base import Communicator
from tpi.config import ModelConfig
from tpi.model.blocks import BlockSource
from tpi.model.head import Candidates, merge_topk, pack, piece_topk
from tpi.model.kvcache import KVCache
from tpi.model.moe import mix_experts, route
from tpi.model.layers import apply_rope, gated, linear, rms_norm, rope_cos_sin, rope_inv_freq
from tpi.plan import DeviceShard
from tpi.weights.slicing import FUSED, layer_kinds
from tpi.timing import Breakdown, Stopwatch


@dataclass(frozen=True)
class StepContext:
    slots: list[int]
    starts: list[int]
    length: int                   # keys visible after this step: max(starts) + T
    rope: dict                    # layer type -> (cos, signed sin), each (B, 1, T, head_dim)
    masks: dict                   # layer type -> (B, 1, T, length) bool, or None when all keys are visible


class ShardRunner:
    def __init__(self, cfg: ModelConfig, shard: DeviceShard, blocks: BlockSource, *,
                 compute_dtype: torch.dtype = torch.float32, max_seq: int = 2048,
                 num_slots: int = 1, kv_dtype: torch.dtype | None = None, head_topk: int = 1,
                 kv_slots_planned: int | None = None):
        """kv_slots_planned: KV slots the block source's budget already leaves room for (default:
        all of them); each slot allocated beyond these takes its bytes from the block source
        (`make_room`)."""
        self.cfg, self.shard, self.blocks = cfg, shard, blocks
        self.head_topk = head_topk    # K: output-head candidates per device (same on every device)
        self.dtype = compute_dtype
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5  # attention logits' scale
        self.layer_types = [cfg.layer_type(i) for i in range(cfg.num_layers)]
        # the blocks each layer is run from: attention, then its MLP (whose experts moe_partial asks for)
        self.kinds = [layer_kinds(cfg, i)[:2] for i in range(cfg.num_layers)]
        self.inv_freq = {t: rope_inv_freq(cfg, t) for t in set(self.layer_types)}
        self.cache = KVCache(cfg.num_layers, num_slots, shard.num_kv_heads, max_seq,
                             cfg.head_dim, kv_dtype or compute_dtype)
        self.kv_slots_planned = num_slots if kv_slots_planned is None else kv_slots_planned
        g = cfg.group_size
        q0, q1 = shard.q_heads
        # Each local query head reads local KV head (global head // group - first KV head).
        self.regular_gqa = q0 % g == 0 and shard.num_q_heads == shard.num_kv_heads * g
        self.kv_index = torch.tensor([h // g - shard.kv_heads[0] for h in range(q0, q1)])
        # Decode attention needs only that every local KV head serves the same number of
        # consecutive local query heads (SmolLM2 on 4 devices: 2 heads of one KV head).
        nq, nkv = shard.num_q_heads, shard.num_kv_heads
        self.grouped_decode = nq % nkv == 0 and torch.equal(
            self.kv_index, torch.arange(nkv).repeat_interleave(nq // nkv))
        self.last = Breakdown()

    def memory_status(self) -> dict:
        """Bytes this shard holds now (layer weights + KV cache) against its budget."""
        kv = self.cache.nbytes
        blocks = self.blocks.describe()
        weights, budget = blocks.get("held_bytes"), blocks.get("budget_bytes")
        kv_room = max(self.kv_slots_planned, self.cache.allocated) * self.cache.slot_bytes
        return {"used_bytes": None if weights is None else weights + kv,
                "budget_bytes": None if budget is None else budget + kv_room,
                "weights_bytes": weights, "weights_high_water_bytes": blocks.get("high_water_bytes"),
                "kv_cache_bytes": kv, "resident_blocks": blocks.get("resident_blocks"),
                "streamed_blocks": blocks.get("streamed_blocks"),
                "on_demand_blocks": blocks.get("on_demand_blocks"), "bytes_read": blocks.get("bytes_read")}

    def make_room(self, slots: list[int]) -> None:
        """Allocate the KV of slots used for the first time; past the slots the budget was
        planned with, the block source gives up resident weights for them first (it streams
        more from then on; tpi.weights.scheduler), so the device stays within its budget."""
        new = self.cache.missing(slots)
        extra = self.cache.allocated + len(new) - self.kv_slots_planned
        if extra > 0:
            self.blocks.shrink(extra * self.cache.slot_bytes)
            self.kv_slots_planned += extra
        self.cache.allocate(new)

    def step(self, x: torch.Tensor, comm: Communicator, slots: list[int], starts: list[int],
             every_position: bool = False) -> Candidates | None:
        """All layers, then the output head: on the master, the merged top-K candidates for
        the last position of each row, or for every position (B*T rows); None on a worker."""
        x = self.forward(x, comm, slots, starts)                       # (B, T, H)
        h = x.reshape(-1, x.shape[-1]) if every_position else x[:, -1]  # (R, H)
        return self.head_candidates(h, comm)

    def forward(self, x: torch.Tensor, comm: Communicator, slots: list[int], starts: list[int]) -> torch.Tensor:
        """x: (B, T, H) hidden states of B sequences whose first new token sits at starts[b].
        Returns (B, T, H) after all layers (identical on every device)."""
        x = x.to(self.dtype, copy=True)  # (B, T, H) this device's residual stream, added to in place
        step = self.step_context(slots, starts, x.shape[1])
        timings = Breakdown()
        watch = Stopwatch()
        attn_s = 0.0  # compute seconds of the attention blocks (the rest of the layers' is the MLP's)
        for layer in range(self.cfg.num_layers):
            spent = [0.0, 0.0, 0.0]  # compute, comm, disk wait
            sparse = self.cfg.is_sparse(layer)
            for kind in self.kinds[layer]:
                partial = None
                pieces = 1 if kind == "attn" else self.blocks.pieces(kind)
                for piece in range(pieces):
                    watch.lap()
                    blk = self.blocks.get(layer, kind, piece)
                    spent[2] += watch.lap()
                    if kind == "attn":
                        partial = self.attention_partial(layer, x, blk, step)
                    elif sparse:
                        partial = self.moe_partial(layer, x, blk)
                    elif pieces == 1:
                        partial = self.mlp_partial(x, blk)
                    else:  # the pieces' partials are added here, in float32, before the one all-reduce
                        part = self.mlp_partial(x, blk).float()
                        partial = part if partial is None else partial.add_(part)
                    if piece == 0:  # the output norm is used after the block is released
                        out_norm = self._out_norm(blk, kind)
                    self.blocks.release(layer, kind, piece)
                    spent[0] += watch.lap()
                if kind == "attn":
                    attn_s += spent[0]  # attention comes first in a layer
                total = comm.all_reduce(partial.to(x.dtype))
                spent[1] += watch.lap()
                x.add_(total if out_norm is None else self.norm(total, out_norm))
            timings.layers.append(spent)
            timings.compute_s += spent[0]
            timings.comm_s += spent[1]
            timings.disk_wait_s += spent[2]
        timings.attention_s, timings.mlp_s = attn_s, timings.compute_s - attn_s
        self.last = timings
        return x

    def head_candidates(self, h: torch.Tensor, comm: Communicator) -> Candidates | None:
        """h (R, H) final hidden states -> every device's top-K candidates, gathered to the
        master in float32 (token ids stay exact); None on a worker, which learns nothing."""
        watch = Stopwatch()
        spent = [0.0, 0.0, 0.0]  # compute, comm, disk wait
        L, k = self.cfg.num_layers, self.head_topk
        values, ids = [], []
        for piece in range(self.blocks.pieces("head")):
            watch.lap()
            blk = self.blocks.get(L, "head", piece)
            spent[2] += watch.lap()
            v, i = piece_topk(h.to(self.dtype), blk, k, self.cfg)   # (R, k') each
            values.append(v)
            ids.append(i)
            self.blocks.release(L, "head", piece)
            spent[0] += watch.lap()
        v, i = merge_topk(values, ids, k)                                         # (R, K) each
        packed = pack(v, i, self.shard.rank, k)                                   # (R, 2, K)
        spent[0] += watch.lap()
        gathered = comm.gather(packed)                                 # (N, R, 2, K) on rank 0
        spent[1] += watch.lap()
        t = self.last
        t.head = spent
        t.compute_s, t.comm_s, t.disk_wait_s = t.compute_s + spent[0], t.comm_s + spent[1], t.disk_wait_s + spent[2]
        return None if gathered is None else Candidates.unpack(gathered, self.cfg.vocab_size)

    def step_context(self, slots: list[int], starts: list[int], T: int) -> "StepContext":
        """What every layer of one forward step shares: positions, rotary tables, mask; the
        rows' KV slots hold memory from here on (make_room)."""
        self.make_room(slots)
        positions = torch.tensor(starts)[:, None] + torch.arange(T)[None, :]  # (B, T)
        length = max(starts) + T
        rope = {t: rope_cos_sin(f, positions, self.dtype) for t, f in self.inv_freq.items()}  # (B, 1, T, hd) x2
        masks = {t: self._mask(positions, length, self.cfg.window(t)) for t in self.inv_freq}
        return StepContext(slots, starts, length, rope, masks)

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The family's RMSNorm over the last dimension of x."""
        return rms_norm(x, weight, self.cfg.rms_norm_eps, self.cfg.norm_offset)

    def _out_norm(self, blk, kind: str) -> torch.Tensor | None:
        """Gemma's norm of the attention / MLP output (applied after the all-reduce: it is not
        linear), copied because a streamed block's memory is reused once released."""
        w = blk.get("attn_out_norm" if kind == "attn" else "mlp_out_norm")
        return None if w is None else w.clone()

    def attention_partial(self, layer: int, x: torch.Tensor, blk, step: "StepContext") -> torch.Tensor:
        """This device's share of the attention output (B, T, H), before the all-reduce."""
        cfg, B, T = self.cfg, x.shape[0], x.shape[1]
        hd, nq, nkv = cfg.head_dim, self.shard.num_q_heads, self.shard.num_kv_heads
        kind = self.layer_types[layer]
        cos, sin = step.rope[kind]
        h = self.norm(x, blk["input_norm"])
        q, k, v = self._projections(h, blk, "qkv", (nq * hd, nkv * hd, nkv * hd))       # (B, T, n*hd) each
        q = self._head_norm(q.view(B, T, nq, hd), blk.get("q_norm")).transpose(1, 2)   # (B, nq, T, hd)
        k = self._head_norm(k.view(B, T, nkv, hd), blk.get("k_norm")).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)                                      # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.cache.write(layer, step.slots, step.starts, k, v)
        if B > 1 and len(set(step.starts)) > 1:
            # Rows at different positions (batched decode): each row attends over its own
            # keys only. One padded, masked call computes the same maths but rounds
            # differently from the row run alone, and batching must not change greedy output.
            out = torch.cat([self._attend(layer, q[b:b + 1], [step.slots[b]], step.starts[b], T)
                             for b in range(B)])                                       # (B, nq, T, hd)
        else:
            out = self._sdpa(q, *self.cache.read(layer, step.slots, step.length), step.masks[kind])
        out = out.transpose(1, 2).reshape(B, T, nq * hd)                               # (B, T, nq*hd)
        return linear(out, blk["o"], blk.get("o_bias"))                                # (B, T, H) partial

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Per-head RMSNorm over head_dim of x (B, T, heads, hd) when the family has one (q/k norm)."""
        return x if weight is None else self.norm(x, weight)

    def _attend(self, layer: int, q: torch.Tensor, slots: list[int], start: int, T: int) -> torch.Tensor:
        """q (1, nq, T, hd) of one row whose first new token sits at `start` -> (1, nq, T, hd)."""
        length = start + T
        positions = start + torch.arange(T)[None, :]                                   # (1, T)
        mask = self._mask(positions, length, self.cfg.window(self.layer_types[layer]))
        return self._sdpa(q, *self.cache.read(layer, slots, length), mask)

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, nq, T, hd), cached keys/values (B, nkv, L, hd) -> (B, nq, T, hd)."""
        if q.shape[2] == 1 and mask is None:
            return self._decode_attention(q, keys, values)
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        if self.regular_gqa:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=False,
                                                  enable_gqa=True, scale=self.scale)
        keys = keys.index_select(1, self.kv_index)                                     # (B, nq, L, hd)
        values = values.index_select(1, self.kv_index)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)

    @staticmethod
    def _projections(h: torch.Tensor, blk, fused: str, sizes: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """The projections of h that FUSED groups under `fused` (q, k, v or gate, up): one matmul
        by the stacked matrix, split by `sizes` (None: equal parts), or one matmul each for a
        block whose parts were left separate (GGUF quantization; tpi.weights.slicing)."""
        if fused in blk:
            out = linear(h, blk[fused], blk.get(fused + "_bias"))
            return out.split(sizes, dim=-1) if sizes else out.chunk(len(FUSED[fused]), dim=-1)
        return [linear(h, blk[p], blk.get(p + "_bias")) for p in FUSED[fused]]

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One query position per row (decode), every cached key visible: softmax(q k^T * scale) v
        with two plain matmuls, in float32. SDPA computes the same, but its CPU kernel tiles for
        many queries and costs ~4x this for one query over a few hundred keys (measured here)."""
        B, nq, _, hd = q.shape
        if self.grouped_decode:  # the query heads of one KV head become rows of one matmul with its keys
            nkv = keys.shape[1]
            q = q.reshape(B, nkv, nq // nkv, hd)                                      # (B, nkv, group, hd)
        else:
            keys, values = keys.index_select(1, self.kv_index), values.index_select(1, self.kv_index)
            q = q.reshape(B, nq, 1, hd)                                               # (B, nq, 1, hd)
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)).mul_(self.scale)  # (B, n, rows, L)
        out = torch.matmul(scores.softmax(-1), values.float())                        # (B, n, rows, hd)
        return out.to(self.dtype).reshape(B, nq, 1, hd)

    def mlp_partial(self, x: torch.Tensor, blk) -> torch.Tensor:
        """This device's share of the MLP output (B, T, H), before the all-reduce."""
        return self._gated_mlp(self.norm(x, blk["post_norm"]), blk)

    def moe_partial(self, layer: int, x: torch.Tensor, blk) -> torch.Tensor:
        """This device's share (B, T, H) of a mixture-of-experts MLP, before the all-reduce:
        `blk` holds the norm and the router; the experts the router chose among the device's
        are asked of the block source one at a time (tpi.model.moe)."""
        B, T, H = x.shape
        h = self.norm(x, blk["post_norm"]).reshape(B * T, H)                           # (R, H)
        weights, chosen = route(h, blk["router"], self.cfg.experts_per_token, self.cfg.norm_topk_prob)
        e0 = self.shard.experts[0]
        out = mix_experts(h, weights, chosen, range(*self.shard.experts),
                          expert=lambda e: self.blocks.get(layer, "expert", e - e0),
                          done=lambda e: self.blocks.release(layer, "expert", e - e0),
                          mlp=self._gated_mlp)
        return out.view(B, T, H)                                                       # partial

    def _gated_mlp(self, h: torch.Tensor, blk) -> torch.Tensor:
        """down(act(gate(h)) * up(h)) over the block's columns: a partial sum of the output."""
        gate, up = self._projections(h, blk, "gate_up")                                # (..., w) each
        return linear(gated(gate, up, self.cfg.hidden_act), blk["down"], blk.get("down_bias"))

    @staticmethod
    def _mask(positions: torch.Tensor, length: int, window: int | None) -> torch.Tensor | None:
        """Boolean (B, 1, T, L): key j is visible to the query at position p if j <= p
        (and p - j < window for a sliding layer). None when every key is visible."""
        B, T = positions.shape
        if B == 1 and T == 1 and (window is None or length <= window):
            return None
        keys = torch.arange(length)[None, None, :]     # (1, 1, L)
        pos = positions[:, :, None]                    # (B, T, 1)
        visible = keys <= pos
        if window is not None:
            visible &= keys > pos - window
        return visible[:, None]
