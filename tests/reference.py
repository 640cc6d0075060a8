"""The Hugging Face reference: small random-weight models of each family made with
Hugging Face's own classes, and its greedy output. Imported by tests (not a conftest, so
per-directory conftest files cannot shadow it)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Each family's config as Hugging Face writes it; small enough to run in a second.
TINY_FAMILIES = {
    "llama3": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=96, intermediate_size=200,
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "llama-tied": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
    "mistral": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=80, intermediate_size=192,
        num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, sliding_window=None,
        max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=96, intermediate_size=224,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True,
        max_position_embeddings=512, use_sliding_window=False,
    ),
    "qwen3": dict(  # head_dim 24 is not hidden / heads (16): the explicit head_dim is what counts
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=96, intermediate_size=192,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=False, max_position_embeddings=512, attention_bias=False,
    ),
    # Sliding layers (window 6, shorter than the tests' prompts) with their own RoPE base around a
    # global one with linear scaling; query_pre_attn_scalar is not head_dim; softcapped logits.
    "gemma3": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=96, intermediate_size=192,
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
        query_pre_attn_scalar=24, sliding_window=6, hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=30.0, tie_word_embeddings=False, max_position_embeddings=512,
    ),
    # Mixtures of experts: expert counts that 2, 3, 4 and 5 devices do not divide (Qwen3-MoE's 3
    # experts on 4 or 5 devices are split by columns); Qwen3-MoE without renormalised weights.
    "mixtral": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=96, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, num_local_experts=7,
        num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=512,
    ),
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=96, intermediate_size=256,
        moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, num_experts=3, num_experts_per_tok=2, norm_topk_prob=False,
        tie_word_embeddings=False, max_position_embeddings=512,
    ),
    # Qwen3-MoE with dense MLP layers (of intermediate_size, wider than the experts): layer 1 by
    # mlp_only_layers, 5 experts (2, 3 and 4 devices do not divide them); and every other layer
    # by decoder_sparse_step 2 (layers 0 and 2 dense), 3 experts, renormalised weights.
    "qwen3_moe_mlp_only": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=96, intermediate_size=320,
        moe_intermediate_size=128, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, num_experts=5, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
        tie_word_embeddings=False, max_position_embeddings=512,
    ),
    "qwen3_moe_sparse_step": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=96, intermediate_size=192,
        moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, num_experts=3, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2,
        tie_word_embeddings=False, max_position_embeddings=512,
    ),
}
# Families whose norm weights get random values (HF initialises them to 1, or 0 for Gemma's
# (1 + w)): a norm applied in the wrong place or not at all must change the tokens.
RANDOM_NORMS = {"qwen3", "gemma3", "qwen3_moe", "qwen3_moe_mlp_only", "qwen3_moe_sparse_step"}


def make_tiny_model(family: str, out: Path, smollm2: Path, init_range: float = 0.2) -> Path:
    """A random-weight HF model directory of `family`, with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_FAMILIES[family])
    spec.update(vocab_size=49152, rms_norm_eps=1e-5, initializer_range=init_range, bos_token_id=1, eos_token_id=2)
    spec.setdefault("hidden_activation" if "hidden_activation" in spec else "hidden_act", "silu")
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF zero-initialises biases; give Qwen2's q/k/v biases real values
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
            elif family in RANDOM_NORMS and "norm" in name:
                p.add_(torch.randn_like(p), alpha=0.2)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / f).is_file():
            shutil.copyfile(smollm2 / f, out / f)
    return out


def hf_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """The Hugging Face reference: float32, greedy, exactly `new_tokens` tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
