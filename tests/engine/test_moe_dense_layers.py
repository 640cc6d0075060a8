"""Qwen3-MoE with dense MLP layers (mlp_only_layers, decoder_sparse_step): which layers are
dense is transformers' own choice, the plan covers the dense columns and the experts once
each, and a checkpoint that disagrees with its config is refused by name with no store left
behind. (Greedy tokens against transformers: test_hf_equivalence.py; streaming under a budget:
test_moe_streaming.py; the planner's estimate: tests/registry/test_planner.py.)"""
from __future__ import annotations

import json
import shutil

import pytest

from tpi.config import UnsupportedModelError, parse_hf_config
from tpi.plan import ShardPlan, make_plan

QWEN3_MOE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=64,
                 intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=16, num_experts=5, num_experts_per_tok=2, vocab_size=256)


@pytest.mark.parametrize("mlp_only,step", [([], 1), ([1], 1), ([], 2), ([0, 5], 3), ([2, 4], 2), ([9], 1)])
def test_dense_layers_are_those_transformers_builds(mlp_only, step):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeMLP

    spec = dict(QWEN3_MOE, mlp_only_layers=mlp_only, decoder_sparse_step=step)
    hf = Qwen3MoeConfig(**{k: v for k, v in spec.items() if k not in ("architectures", "model_type")})
    want = tuple(i for i in range(hf.num_hidden_layers)
                 if isinstance(Qwen3MoeDecoderLayer(hf, i).mlp, Qwen3MoeMLP))
    cfg = parse_hf_config(spec)
    assert cfg.dense_layers == want
    assert [cfg.is_sparse(i) for i in range(6)] == [i not in want for i in range(6)]
    assert cfg.intermediate_size == 64 and cfg.dense_intermediate_size == (192 if want else 0)


def test_no_sparse_layer_is_a_dense_model():
    """decoder_sparse_step beyond the layers, or no experts: every MLP is the dense one."""
    for spec in (dict(QWEN3_MOE, decoder_sparse_step=7), dict(QWEN3_MOE, num_experts=0)):
        cfg = parse_hf_config(spec)
        assert not cfg.is_moe and cfg.dense_layers == () and cfg.intermediate_size == 192


def test_bad_sparse_step_refused():
    with pytest.raises(UnsupportedModelError, match="decoder_sparse_step=0"):
        parse_hf_config(dict(QWEN3_MOE, decoder_sparse_step=0))


@pytest.mark.parametrize("n", range(1, 7))
def test_every_dense_column_and_expert_placed_once(n):
    cfg = parse_hf_config(dict(QWEN3_MOE, mlp_only_layers=[1, 3]))
    weights = [1.0 + (i % 3) for i in range(n)]
    plan = make_plan(cfg, weights)
    assert [c for s in plan.shards for c in range(*s.dense_cols)] == list(range(192))
    held = sorted((e, c) for s in plan.shards for e in range(*s.experts) for c in range(*s.mlp_cols))
    assert held == [(e, c) for e in range(5) for c in range(64)]
    assert ShardPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan  # as the manifest keeps it


def test_checkpoint_disagreeing_with_its_config_is_refused(tiny_model, tmp_path):
    """A fine-tune's config.json that says layer 1 is sparse while its checkpoint holds a dense
    MLP there: the split names the tensor and the layer and leaves no manifest behind."""
    from tpi.weights.splitter import split_checkpoint

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe_mlp_only"), model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    hf["mlp_only_layers"] = []
    (model_dir / "config.json").write_text(json.dumps(hf))
    cfg = parse_hf_config(hf)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.\w+_proj\.weight is a dense MLP weight, .* layer 1 a mixture"):
        split_checkpoint(model_dir, make_plan(cfg, [1.0, 2.0]), tmp_path / "store")
    assert not (tmp_path / "store" / "manifest.json").exists()

    hf["mlp_only_layers"] = [0, 1]  # and the other way: experts where the config wants a dense MLP
    (model_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\..* is a mixture-of-experts weight, .* layer 0 a dense MLP"):
        split_checkpoint(model_dir, make_plan(parse_hf_config(hf), [1.0, 2.0]), tmp_path / "store")
    assert not (tmp_path / "store" / "manifest.json").exists()
