"""The shard plan: uneven, weighted, covering every head and column exactly once."""
from __future__ import annotations

import pytest

from tpi.config import ModelConfig, UnsupportedModelError, parse_hf_config
from tpi.plan import PlanError, make_plan, parse_weights

SMOL = dict(architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)


def smol() -> ModelConfig:
    return parse_hf_config(SMOL)


@pytest.mark.parametrize("n", range(1, 10))
def test_every_head_and_column_assigned_once(n):
    cfg = smol()
    plan = make_plan(cfg, [1.0] * n)
    heads = [h for s in plan.shards for h in range(*s.q_heads)]
    cols = [c for s in plan.shards for c in range(*s.mlp_cols)]
    assert heads == list(range(cfg.num_heads))
    assert cols == list(range(cfg.intermediate_size))
    for s in plan.shards:
        needed = {h // cfg.group_size for h in range(*s.q_heads)}
        assert set(range(*s.kv_heads)) == needed
    assert [s.adds_row_bias for s in plan.shards] == [True] + [False] * (n - 1)


def test_kv_head_shared_by_two_devices_is_replicated():
    plan = make_plan(smol(), [1, 1])      # heads 0-4 and 5-8; KV head 1 serves heads 3, 4, 5
    assert plan.shards[0].kv_heads == (0, 2) and plan.shards[1].kv_heads == (1, 3)


def test_weights_shift_work():
    plan = make_plan(smol(), parse_weights("1,1,2"))
    third = plan.shards[2]
    assert third.num_q_heads >= 4
    assert 0.45 <= third.mlp_width / 1536 <= 0.55


def test_more_devices_than_heads_is_refused():
    with pytest.raises(PlanError, match="only 9 query heads"):
        make_plan(smol(), [1.0] * 10)


def test_bad_weights_refused():
    with pytest.raises(PlanError):
        parse_weights("1,x")
    with pytest.raises(PlanError):
        make_plan(smol(), [1, 0])


def test_unsupported_architecture_named():
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        parse_hf_config(dict(SMOL, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        parse_hf_config(dict(SMOL, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
