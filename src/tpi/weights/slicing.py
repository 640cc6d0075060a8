"""The one function that slices a checkpoint tensor for one device (pure, no I/O).

Both the splitter (offline) and tests (sharded == unsharded) use it.

A layer is stored per device as two blocks:
  attn: input_norm (H)          q (nq*hd, H)   k, v (nkv*hd, H)   o (H, nq*hd)
        [q_bias, k_bias, v_bias (rows)]   [o_bias (H), device 0 only]
  mlp:  post_norm (H)           gate, up (w, H)   down (H, w)
        [gate_bias, up_bias (w)]          [down_bias (H), device 0 only]
where nq/nkv are the device's query/KV heads, hd the head dim and w its MLP width.
"""
from __future__ import annotations

import re

import torch

from tpi.config import ModelConfig
from tpi.plan import DeviceShard

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# HF suffix -> (block kind, local name, how to slice)
#   "rows_q": output rows of the device's query heads   "rows_kv": rows of its KV heads
#   "cols_q": input columns of its query heads          "rows_mlp"/"cols_mlp": MLP columns
#   "whole": replicated                                 "row_bias": device 0 only
LAYER_TENSORS = {
    "input_layernorm.weight": ("attn", "input_norm", "whole"),
    "self_attn.q_proj.weight": ("attn", "q", "rows_q"),
    "self_attn.k_proj.weight": ("attn", "k", "rows_kv"),
    "self_attn.v_proj.weight": ("attn", "v", "rows_kv"),
    "self_attn.o_proj.weight": ("attn", "o", "cols_q"),
    "self_attn.q_proj.bias": ("attn", "q_bias", "rows_q"),
    "self_attn.k_proj.bias": ("attn", "k_bias", "rows_kv"),
    "self_attn.v_proj.bias": ("attn", "v_bias", "rows_kv"),
    "self_attn.o_proj.bias": ("attn", "o_bias", "row_bias"),
    "post_attention_layernorm.weight": ("mlp", "post_norm", "whole"),
    "mlp.gate_proj.weight": ("mlp", "gate", "rows_mlp"),
    "mlp.up_proj.weight": ("mlp", "up", "rows_mlp"),
    "mlp.down_proj.weight": ("mlp", "down", "cols_mlp"),
    "mlp.gate_proj.bias": ("mlp", "gate_bias", "rows_mlp"),
    "mlp.up_proj.bias": ("mlp", "up_bias", "rows_mlp"),
    "mlp.down_proj.bias": ("mlp", "down_bias", "row_bias"),
}

# Tensors the master keeps whole: embedding, final norm, output head.
HEAD_TENSORS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}

BLOCK_KINDS = ("attn", "mlp")


def parse_layer_name(name: str) -> tuple[int, str, str, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp', 'up', 'rows_mlp'); None if not a layer tensor."""
    m = LAYER_RE.match(name)
    if not m:
        return None
    suffix = m.group(2)
    if suffix.endswith("rotary_emb.inv_freq"):
        return None
    if suffix not in LAYER_TENSORS:
        raise ValueError(f"unexpected layer tensor {name!r}: not a Llama-family weight")
    kind, local, rule = LAYER_TENSORS[suffix]
    return int(m.group(1)), kind, local, rule


def slice_for_device(tensor: torch.Tensor, rule: str, cfg: ModelConfig, shard: DeviceShard) -> torch.Tensor | None:
    """This device's part of `tensor` under `rule`; None if the device stores none of it."""
    hd = cfg.head_dim
    if rule == "whole":
        return tensor
    if rule == "row_bias":
        return tensor if shard.adds_row_bias else None
    if rule == "rows_q":
        return tensor[shard.q_heads[0] * hd : shard.q_heads[1] * hd]
    if rule == "rows_kv":
        return tensor[shard.kv_heads[0] * hd : shard.kv_heads[1] * hd]
    if rule == "cols_q":
        return tensor[:, shard.q_heads[0] * hd : shard.q_heads[1] * hd]
    if rule == "rows_mlp":
        return tensor[shard.mlp_cols[0] : shard.mlp_cols[1]]
    if rule == "cols_mlp":
        return tensor[:, shard.mlp_cols[0] : shard.mlp_cols[1]]
    raise ValueError(f"unknown slicing rule {rule!r}")
