"""End to end: greedy tokens from TPI's tensor-parallel engine equal Hugging Face's."""
from __future__ import annotations

import pytest

from reference import TINY_FAMILIES, hf_greedy
from tpi.settings import RuntimeOptions
from tpi.engine import build_inproc_engine
from tpi.settings import ModelSettings
from tpi.model.sampling import SamplingParams

NEW_TOKENS = 32
F32 = RuntimeOptions(dtype="float32", max_seq=256)


def tpi_greedy(model_dir, weights, prompt, new_tokens=NEW_TOKENS):
    engine = build_inproc_engine(ModelSettings(str(model_dir), weights), F32)
    try:
        engine.generator.stop_ids = set()  # compare exactly new_tokens tokens, as HF does
        return engine.generator.generate(prompt, SamplingParams(max_new_tokens=new_tokens)).tokens
    finally:
        engine.close()


@pytest.fixture(scope="module")
def smollm2_case(smollm2_dir):
    from tpi.tokenizer import ChatTokenizer

    tok = ChatTokenizer(smollm2_dir)
    prompt = tok.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    return prompt, hf_greedy(smollm2_dir, prompt, NEW_TOKENS)


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 5])
def test_smollm2_greedy_matches_transformers(smollm2_dir, smollm2_case, devices):
    prompt, expected = smollm2_case
    assert tpi_greedy(smollm2_dir, [1.0] * devices, prompt) == expected


# Uneven weights appear in every family's device sets.
SPLITS = [[1.0], [1.0, 2.0], [1.0, 1.0, 3.0], [2.0, 1.0, 1.0, 1.0, 1.0]]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("weights", SPLITS, ids=lambda w: f"N{len(w)}")
def test_random_model_greedy_matches_transformers(tiny_model, family, weights):
    model_dir = tiny_model(family)
    prompt = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
    expected = hf_greedy(model_dir, prompt, NEW_TOKENS)
    assert len(set(expected)) > 3, "the reference output is degenerate; the test would prove little"
    assert tpi_greedy(model_dir, weights, prompt) == expected


def test_gemma3_prompt_longer_than_its_sliding_window(tiny_model):
    """Gemma 3's sliding layers must forget what lies beyond the window, its global ones not."""
    from tpi.config import load_model_config

    model_dir = tiny_model("gemma3")
    window = load_model_config(model_dir).sliding_window
    prompt = [1, *range(300, 300 + 3 * window)]
    assert len(prompt) > window
    expected = hf_greedy(model_dir, prompt, 12)
    assert tpi_greedy(model_dir, [1.0, 3.0], prompt, new_tokens=12) == expected


# (experts, their columns, the dense layers' columns) per device, weights 2 : 1 : 1.5 : 2
FOUR_DEVICE_PLACEMENT = {
    "mixtral": [((0, 2), (0, 128), (0, 0)), ((2, 3), (0, 128), (0, 0)), ((3, 5), (0, 128), (0, 0)),
                ((5, 7), (0, 128), (0, 0))],
    "qwen3_moe": [((0, 1), (0, 64), (0, 0)), ((0, 1), (64, 128), (0, 0)), ((1, 2), (0, 128), (0, 0)),
                  ((2, 3), (0, 128), (0, 0))],
    "qwen3_moe_mlp_only": [((0, 2), (0, 128), (0, 128)), ((2, 3), (0, 128), (128, 192)),
                           ((3, 4), (0, 128), (192, 256)), ((4, 5), (0, 128), (256, 320))],
    "qwen3_moe_sparse_step": [((0, 1), (0, 64), (0, 59)), ((0, 1), (64, 128), (59, 89)),
                              ((1, 2), (0, 128), (89, 133)), ((2, 3), (0, 128), (133, 192))],
}


@pytest.mark.parametrize("family", sorted(FOUR_DEVICE_PLACEMENT))
def test_moe_on_four_uneven_devices(tiny_model, family):
    """4 devices: Mixtral's 7 experts go 2/1/2/2 by weight; Qwen3-MoE's 3 experts cannot go
    whole, so the first is split by columns between the first two devices. The dense MLP
    layers of the Qwen3-MoE variants (mlp_only_layers, decoder_sparse_step) are split by
    columns in proportion to the weights, as in a dense model. (N = 1, 2, 3 and 5, uneven:
    test_random_model_greedy_matches_transformers, which runs every family.)"""
    from tpi.config import load_model_config
    from tpi.plan import make_plan

    model_dir = tiny_model(family)
    weights = [2.0, 1.0, 1.5, 2.0]
    cfg = load_model_config(model_dir)
    placed = [(s.experts, s.mlp_cols, s.dense_cols) for s in make_plan(cfg, weights).shards]
    assert placed == FOUR_DEVICE_PLACEMENT[family]
    assert cfg.dense_layers == {"qwen3_moe_mlp_only": (1,), "qwen3_moe_sparse_step": (0, 2)}.get(family, ())
    prompt = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
    expected = hf_greedy(model_dir, prompt, NEW_TOKENS)
    assert len(set(expected)) > 3, "the reference output is degenerate; the test would prove little"
    assert tpi_greedy(model_dir, weights, prompt) == expected


def test_gemma3_softcapped_logits_match_transformers(tiny_model):
    """Greedy tokens cannot see the final softcapping (it is increasing); the candidates'
    logits can: every device's top-K values equal HF's softcapped logits of those tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("gemma3")
    prompt = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        logits = ref(torch.tensor([prompt])).logits[0]                      # (T, V), softcapped
    assert logits.abs().max() < ref.config.final_logit_softcapping         # the cap is in effect
    engine = build_inproc_engine(ModelSettings(str(model_dir), (1.0, 2.0)), F32)
    try:
        x = engine.embedder.embed(torch.tensor([prompt]))                   # (1, T, H)
        cand = engine.cluster.forward(x, [0], [0], every_position=True)     # T rows
    finally:
        engine.close()
    want = logits.gather(1, cand.ids)                                       # (T, N*K)
    assert torch.allclose(cand.values, want, atol=2e-4, rtol=1e-4)
