"""The one function that slices a checkpoint tensor for one device (pure, no I/O).

Both the splitter (offline) and tests (sharded == unsharded) use it.

A layer is stored per device as two blocks:
  attn: input_norm (H)          qkv ((nq + 2 nkv)*hd, H)   o (H, nq*hd)
        [qkv_bias (rows)]       [o_bias (H), device 0 only]
        [q_norm, k_norm (hd): per-head norms, Qwen3 / Gemma 3]   [attn_out_norm (H): Gemma 3]
  mlp:  post_norm (H)           gate_up (2w, H)   down (H, w)
        [gate_up_bias (2w)]     [down_bias (H), device 0 only]   [mlp_out_norm (H): Gemma 3]
where nq/nkv are the device's query/KV heads, hd the head dim and w its MLP width.
A mixture-of-experts layer stores, instead of the MLP weights,
  mlp:    post_norm (H)   router (E, H), replicated
  expert: one block per expert the device holds (`DeviceShard.experts`, piece p = its p-th):
          gate, up (w, H)   down (H, w), w = the columns `mlp_cols` of that expert it holds
so the scheduler can read just the experts the router chose. A mixture's dense layers
(`ModelConfig.dense_layers`) store their MLP as a "dense" block instead: an "mlp" block of a
dense model, columns `DeviceShard.dense_cols`, cut into pieces the same way.

Fused projections. The table below slices q, k, v (and gate, up) one by one; `fuse_projections`
then stacks each group's rows into one matrix (qkv = [q; k; v], gate_up = [gate; up], the
biases and a quantized weight's per-row tensors likewise), so a layer multiplies by one
matrix where it had three (or two): one kernel call, one output buffer. Row stacking
commutes with slicing and with per-row quantization (int8 / int4 scales and minimums per
row, GGUF groups along each row, the int4 kernel's packing row by row), so a fused store
holds exactly the numbers the separate one did, and computes the same bits
(tests/engine/test_fused_projections.py). GGUF parts of different types stay separate.

Pieces. A block bigger than the store's `max_block_bytes` is cut into pieces so that a
device never holds more than a few pieces at once (the sliding window counts pieces):
  mlp:  by intermediate columns: piece [a, b) holds gate/up rows and down columns a..b of the
        device's range, post_norm whole, down_bias in piece 0 only (added once);
  head: the device's output-head rows (token ids, `DeviceShard.vocab`) by row ranges; each
        piece holds final_norm (H), lm_head (rows, H) and rows (2,) int64 = [first, end) ids.
Attention blocks are never cut (at 70B shape on 8 devices one is 38 MB). The pieces' partial
sums are added on the device before its one all-reduce per block.
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
    "self_attn.q_norm.weight": ("attn", "q_norm", "whole"),
    "self_attn.k_norm.weight": ("attn", "k_norm", "whole"),
    "post_attention_layernorm.weight": ("mlp", "post_norm", "whole"),
    "mlp.gate_proj.weight": ("mlp", "gate", "rows_mlp"),
    "mlp.up_proj.weight": ("mlp", "up", "rows_mlp"),
    "mlp.down_proj.weight": ("mlp", "down", "cols_mlp"),
    "mlp.gate_proj.bias": ("mlp", "gate_bias", "rows_mlp"),
    "mlp.up_proj.bias": ("mlp", "up_bias", "rows_mlp"),
    "mlp.down_proj.bias": ("mlp", "down_bias", "row_bias"),
}

# Families whose tensors differ from the Llama names: their rows replace or add to the table.
# Gemma 3 norms the attention and MLP outputs ("out" norms, applied after the all-reduce);
# its post_attention_layernorm is that output norm, pre_feedforward_layernorm the MLP's input norm.
FAMILY_TENSORS = {
    "gemma3": {
        "post_attention_layernorm.weight": ("attn", "attn_out_norm", "whole"),
        "pre_feedforward_layernorm.weight": ("mlp", "post_norm", "whole"),
        "post_feedforward_layernorm.weight": ("mlp", "mlp_out_norm", "whole"),
    },
    # Expert tensors are named with the expert number replaced by "*" (see `expert_of`).
    "qwen3_moe": {
        "mlp.gate.weight": ("mlp", "router", "whole"),
        "mlp.experts.*.gate_proj.weight": ("expert", "gate", "rows_mlp"),
        "mlp.experts.*.up_proj.weight": ("expert", "up", "rows_mlp"),
        "mlp.experts.*.down_proj.weight": ("expert", "down", "cols_mlp"),
    },
    "mixtral": {
        "block_sparse_moe.gate.weight": ("mlp", "router", "whole"),
        "block_sparse_moe.experts.*.w1.weight": ("expert", "gate", "rows_mlp"),
        "block_sparse_moe.experts.*.w3.weight": ("expert", "up", "rows_mlp"),
        "block_sparse_moe.experts.*.w2.weight": ("expert", "down", "cols_mlp"),
    },
}
EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")

# Tensors the master keeps whole: embedding, final norm, output head.
HEAD_TENSORS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}

# Fused projection -> its parts, stacked by rows in this order (see `fuse_projections`).
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
# What a weight `x` may be stored as: x itself, or quantized (tpi.weights.quant: x.qweight,
# x.scale, x.min, each one row per output row); its bias is x_bias.
_ROW_SUFFIXES = ("", ".qweight", ".scale", ".min", "_bias")

BLOCK_KINDS = ("attn", "mlp", "expert", "dense")
DENSE_KIND = "dense"          # the MLP block of a mixture's dense layer
DENSE_RULES = {"rows_mlp": "rows_dense", "cols_mlp": "cols_dense"}  # its columns: DeviceShard.dense_cols
HEAD_KIND = "head"            # the output head: a pseudo-layer after the last one
DEFAULT_MAX_BLOCK_BYTES = 16 << 20  # small pieces: small window slots, fine-grained retention
# Bytes per stored element, to size pieces before writing them (int4: two per byte; the
# small scales are left out, so a quantized piece may exceed the cap by a few percent).
# gguf (a GGUF file's own types, tpi.weights.gguf_quant): 0.56-1.1; pieces are sized at 1.
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5, "gguf": 1}
PIECE_ALIGN = 64              # MLP piece boundaries, like plan.MLP_ALIGN (int4 groups of 32)


def parse_layer_name(name: str, family: str = "llama") -> tuple[int, str, str, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp', 'up', 'rows_mlp'); None if not a layer tensor."""
    m = LAYER_RE.match(name)
    if not m:
        return None
    suffix = m.group(2)
    if suffix.endswith("rotary_emb.inv_freq"):
        return None
    e = EXPERT_RE.match(suffix)
    if e:
        suffix = f"{e.group(1)}.*.{e.group(3)}"
    table = {**LAYER_TENSORS, **FAMILY_TENSORS.get(family, {})}
    if suffix not in table:
        raise ValueError(f"unexpected layer tensor {name!r}: not a {family}-family weight")
    kind, local, rule = table[suffix]
    return int(m.group(1)), kind, local, rule


def layer_kinds(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    """The blocks of `layer` in the order a device uses them: attention, then the MLP, which
    is a dense model's "mlp", a mixture's router ("mlp") and experts, or a mixture's dense MLP."""
    if cfg.is_moe and not cfg.is_sparse(layer):
        return ("attn", DENSE_KIND)
    return ("attn", "mlp", "expert")


def parse_model_tensor(name: str, cfg: ModelConfig) -> tuple[int, str, str, str] | None:
    """parse_layer_name for this model: the MLP tensors of a mixture's dense layer belong to
    its "dense" block (sliced by `dense_cols`); a tensor of the other kind of MLP than the
    config gives its layer is refused, naming both."""
    parsed = parse_layer_name(name, cfg.family)
    if parsed is None or not cfg.is_moe or parsed[1] == "attn":
        return parsed
    layer, kind, local, rule = parsed
    if cfg.is_sparse(layer):
        if kind == "mlp" and rule != "whole":
            raise ValueError(f"{name} is a dense MLP weight, but the config makes layer {layer} a mixture of "
                             f"experts (its dense layers are {list(cfg.dense_layers)})")
        return parsed
    if kind == "expert" or local == "router":
        raise ValueError(f"{name} is a mixture-of-experts weight, but the config makes layer {layer} a dense "
                         f"MLP (mlp_only_layers / decoder_sparse_step)")
    return layer, DENSE_KIND, local, DENSE_RULES.get(rule, rule)


def expert_of(name: str) -> int | None:
    """The expert number of an expert tensor's name, else None."""
    m = EXPERT_RE.match(name)
    return int(m.group(2)) if m else None


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
    if rule == "rows_dense":
        return tensor[shard.dense_cols[0] : shard.dense_cols[1]]
    if rule == "cols_dense":
        return tensor[:, shard.dense_cols[0] : shard.dense_cols[1]]
    raise ValueError(f"unknown slicing rule {rule!r}")


def cut(total: int, unit_bytes: float, cap: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, total) as the fewest near-equal ranges of at most `cap` bytes each (a range of n
    units holds n * unit_bytes), boundaries on multiples of `align` where possible."""
    from tpi.plan import proportional_split

    if total <= 0:
        return [(0, total)]
    n = max(1, -(-int(total * unit_bytes) // cap))
    align = align if total >= align * n else 1
    while True:
        n = min(n, total // align)
        parts = proportional_split(total, [1.0] * n, unit=align)
        if max(parts) * unit_bytes <= cap or n == total // align:
            break
        n += 1
    out, start = [], 0
    for size in parts:
        out.append((start, start + size))
        start += size
    return out


def block_pieces(cfg: ModelConfig, shard: DeviceShard, dtype: str, cap: int) -> dict[str, list[tuple[int, int]]]:
    """How the device's blocks are cut: kind -> ranges. mlp: local column ranges of its MLP
    width; head: global token-id ranges of its vocabulary slice; attn: one piece (its query
    heads). `dtype` is the storage dtype (the head stays bfloat16 in quantized stores)."""
    elem = ELEMENT_BYTES[dtype]
    head_elem = 2 if dtype in ("int8", "int4") else elem
    H = cfg.hidden_size
    v0 = shard.vocab[0]
    head = [(v0 + a, v0 + b) for a, b in cut(shard.vocab_size, H * head_elem, cap)]
    if cfg.is_moe:  # the MLP block is the router; one block per expert, never cut
        experts = [(e, e + 1) for e in range(*shard.experts)]
        out = {"attn": [(0, shard.num_q_heads)], "mlp": [(0, 0)], "expert": experts, HEAD_KIND: head}
        if cfg.dense_layers:  # the dense layers' MLP, cut by columns as a dense model's
            out[DENSE_KIND] = cut(shard.dense_width, 3 * H * elem, cap, PIECE_ALIGN)
        return out
    mlp = cut(shard.mlp_width, 3 * H * elem, cap, PIECE_ALIGN)
    return {"attn": [(0, shard.num_q_heads)], "mlp": mlp, HEAD_KIND: head}


def fuse_projections(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block's tensors with each group of FUSED stacked by rows under its fused name
    (q, k, v -> qkv; gate, up -> gate_up; and their biases / quantized parts alike). A GGUF
    form (`--dtype gguf`, tpi.weights.gguf_quant) is stacked the same way when every part of
    the group has the same type, and left separate, biases too, when the file gave them
    different types (the runtime takes both). A group must be whole or absent: a block
    holding q without k cannot be run."""
    out = dict(tensors)
    for fused, parts in FUSED.items():
        forms = [_gguf_form(out, p) for p in parts]
        if any(forms):
            if not _same_gguf_form(out, parts, forms):
                continue  # different GGUF types: left separate
            for s in forms[0]:
                names = [f"{p}.{s}" for p in parts]
                out[f"{fused}.{s}"] = out[names[0]] if s == "gfirst" else torch.cat([out[n] for n in names])
                for n in names:
                    del out[n]
        for suffix in _ROW_SUFFIXES:
            present = [p + suffix in out for p in parts]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"cannot fuse {fused}{suffix}: the block has only "
                                 f"{[p + suffix for p, ok in zip(parts, present) if ok]}")
            out[fused + suffix] = torch.cat([out.pop(p + suffix) for p in parts])
    return out


# A GGUF form's tensors (tpi.weights.gguf_quant.SUFFIXES): one row per output row, except
# gfirst, (1,), which says where the columns start and is the same for rows of one layer.
_GGUF_SUFFIXES = ("gq", "gscale", "gmin", "gd", "gdmin", "gfirst")


def _gguf_form(tensors: dict[str, torch.Tensor], part: str) -> tuple[str, ...]:
    """The GGUF suffixes `part` is stored with in `tensors` (empty: not a GGUF form)."""
    return tuple(s for s in _GGUF_SUFFIXES if f"{part}.{s}" in tensors)


def _same_gguf_form(tensors: dict[str, torch.Tensor], parts: tuple[str, ...], forms: list[tuple]) -> bool:
    """Whether the parts' GGUF forms can be stacked by rows: the same tensors, integer dtype,
    groups per row and first group (so the same GGUF type over the same columns)."""
    if any(f != forms[0] for f in forms):
        return False
    first = [tensors[f"{p}.gq"] for p in parts]
    groups = [tensors[f"{p}.gscale"].shape[1] for p in parts]
    starts = [tensors[f"{p}.gfirst"].tolist() if "gfirst" in forms[0] else None for p in parts]
    return (len({(q.dtype, q.shape[1]) for q in first}) == 1 and len(set(groups)) == 1
            and all(s == starts[0] for s in starts))


def slice_piece(part: torch.Tensor, rule: str, lo: int, hi: int, first: bool) -> torch.Tensor | None:
    """Piece [lo, hi) (local MLP columns) of a device's MLP tensor `part` (as slice_for_device
    returns it); None where the piece stores none of it (row biases live in piece 0)."""
    if rule in ("rows_mlp", "rows_dense"):
        return part[lo:hi]
    if rule in ("cols_mlp", "cols_dense"):
        return part[:, lo:hi]
    if rule == "row_bias":
        return part if first else None
    if rule == "whole":
        return part
    raise ValueError(f"rule {rule!r} is not an MLP rule: only MLP blocks are cut by columns")
