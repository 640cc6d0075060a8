"""Per layer: the sharded layer, summed over devices, equals the unsharded Hugging Face layer.

Tolerances per dtype: float32 differs from HF only by summation order (atol 2e-5 relative
to the output scale); bfloat16 weights and compute are compared with the float32
reference at 3e-2 relative.
"""
from __future__ import annotations

import pytest
import torch

from tpi.config import load_model_config
from tpi.dtypes import FLOAT_DTYPES
from tpi.model.blocks import ResidentBlocks
from tpi.model.shard import ShardRunner
from tpi.plan import make_plan
from tpi.weights.checkpoint import Checkpoint
from tpi.weights.slicing import expert_of, fuse_projections, layer_kinds, parse_model_tensor, slice_for_device

TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}


def shard_blocks(model_dir, cfg, shard, layer, dtype):
    ckpt = Checkpoint(model_dir)
    blocks: dict = {}
    for name in ckpt.names():
        parsed = parse_model_tensor(name, cfg)
        if parsed and parsed[0] == layer:
            _, kind, local, rule = parsed
            expert = expert_of(name)
            if expert is not None and not shard.holds_expert(expert):
                continue
            part = slice_for_device(ckpt.get(name), rule, cfg, shard)
            piece = 0 if expert is None else expert - shard.experts[0]
            if part is not None:
                blocks.setdefault((layer, kind, piece), {})[local] = part.to(dtype)
    return {key: fuse_projections(block) for key, block in blocks.items()}


def hf_layer(model_dir, layer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model.model, model.model.layers[layer]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family,weights", [
    ("qwen2", [1, 1]), ("qwen2", [1, 2, 3]), ("llama3", [3, 1, 1, 1, 1]), ("mistral", [1, 1, 1]),
    ("qwen3", [1, 2, 1]), ("gemma3", [2, 1]), ("mixtral", [1, 3, 1]), ("qwen3_moe", [2, 1]),
    ("qwen3_moe", [1, 1, 2, 1]), ("qwen3_moe_mlp_only", [2, 1, 1]), ("qwen3_moe_sparse_step", [1, 2, 1, 1]),
])
def test_sharded_layer_sums_to_unsharded(tiny_model, family, weights, dtype):
    model_dir = tiny_model(family)
    cfg = load_model_config(model_dir)
    plan = make_plan(cfg, weights)
    # Gemma: a global layer (HF is given no mask); Qwen3-MoE: mlp_only's layer 1 is dense, sparse_step's sparse
    layer = cfg.num_layers - 1 if cfg.layer_types else 1
    torch.manual_seed(0)
    x = torch.randn(1, 7, cfg.hidden_size)                         # (B, T, H)
    base, ref_layer = hf_layer(model_dir, layer)
    with torch.no_grad():
        pos = torch.arange(7)[None]
        types = getattr(base.config, "layer_types", None)
        cos_sin = base.rotary_emb(x, pos, types[layer]) if cfg.layer_types else base.rotary_emb(x, pos)
        h = ref_layer.input_layernorm(x)
        ref_attn = ref_layer.self_attn(h, position_embeddings=cos_sin, attention_mask=None)[0]
        mlp_norm = getattr(ref_layer, "pre_feedforward_layernorm", ref_layer.post_attention_layernorm)
        ref_mlp = ref_layer.mlp(mlp_norm(x))

    tdt = FLOAT_DTYPES[dtype]
    attn_sum = torch.zeros_like(ref_attn)
    mlp_sum = torch.zeros_like(ref_mlp)
    for shard in plan.shards:
        blocks = shard_blocks(model_dir, cfg, shard, layer, tdt)
        runner = ShardRunner(cfg, shard, ResidentBlocks(blocks), compute_dtype=tdt, max_seq=16)
        step = runner.step_context([0], [0], 7)
        xs = x.to(tdt)
        attn_sum += runner.attention_partial(layer, xs, blocks[(layer, "attn", 0)], step).float()
        mlp_kind = layer_kinds(cfg, layer)[1]  # "mlp", or a mixture's dense layer's "dense"
        mlp = runner.moe_partial(layer, xs, blocks[(layer, mlp_kind, 0)]) if cfg.is_sparse(layer) \
            else runner.mlp_partial(xs, blocks[(layer, mlp_kind, 0)])
        mlp_sum += mlp.float()

    tol = TOLERANCE[dtype]
    for got, ref in ((attn_sum, ref_attn), (mlp_sum, ref_mlp)):
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() <= tol * scale, f"{dtype}: error beyond {tol} x {scale}"
