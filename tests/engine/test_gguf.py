"""GGUF files as a model source: greedy tokens equal transformers loading the same file,
the tokenizer equals transformers' conversion of it, and SmolLM2 served from its GGUF file."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import pytest

from gguf_models import quantize_q4_k
from tpi.engine import build_inproc_engine
from tpi.settings import ModelSettings, RuntimeOptions
from tpi.model.sampling import SamplingParams

NEW_TOKENS = 16
PROMPT = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
SPLITS = [[1.0], [1.0, 2.0], [1.0, 1.0, 3.0], [2.0, 1.0, 1.0, 3.0]]
CASES = [("llama", "F16"), ("llama", "Q8_0"), ("llama", "Q4_K"), ("qwen2", "Q4_K"), ("qwen3", "Q4_K"),
         ("llama-tied", "Q8_0")]
# Gemma 3, Mixtral and Qwen3-MoE files, each type. The Gemma 3 prompt (PROMPT, 11 tokens, then
# 16 more) is longer than its sliding window (8); the experts (3 and 5) are not divided by 2, 3
# or 4 devices. The Mixtral reference is transformers' MixtralForCausalLM with the state dict
# the gguf package dequantizes from the file (transformers' GGUF loader has no Mixtral; see
# tests/gguf_models.hf_from_gguf); Gemma 3 and Qwen3-MoE are transformers' GGUF loader's.
# Q4_K on every split; F16 and Q8_0 (slower to write, same reading path) on 2 and 4 devices.
FAMILY_CASES = [(f, w, q) for f in ("gemma3", "mixtral", "qwen3_moe") for q in ("F16", "Q8_0", "Q4_K")
                for w in (SPLITS if q == "Q4_K" else SPLITS[1::2])]
# Gemma 3 4B-27B's linear RoPE scaling of the global layers and a final logit softcap:
# transformers' GGUF loader reads neither, so the reference is built as Mixtral's.
FAMILY_CASES += [("gemma3-scaled", w, "Q4_K") for w in SPLITS[2:]]
# Mixtral as converted before April 2024 (blk.N.ffn_gate.E.weight, one tensor per expert).
FAMILY_CASES += [("mixtral-legacy", w, "Q4_K") for w in SPLITS[2:]]


def tpi_greedy(source, weights, prompt, opts, new_tokens=NEW_TOKENS):
    engine = build_inproc_engine(ModelSettings(str(source), weights), opts)
    try:
        engine.generator.stop_ids = set()  # exactly new_tokens tokens, as the reference
        return engine.generator.generate(prompt, SamplingParams(max_new_tokens=new_tokens)).tokens
    finally:
        engine.close()


@pytest.fixture
def reference(gguf_greedy_reference):
    return lambda family, qtype: gguf_greedy_reference(family, qtype, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("family,weights,qtype", [(f, w, q) for f, q in CASES for w in SPLITS] + FAMILY_CASES,
                         ids=lambda c: f"N{len(c)}" if isinstance(c, list) else str(c))
def test_gguf_greedy_matches_transformers(gguf_model, reference, family, qtype, weights):
    """Dequantized exactly (float32 store and compute): token for token transformers' answer."""
    expected = reference(family, qtype)
    assert len(set(expected)) > 3, "the reference output is degenerate; the test would prove little"
    got = tpi_greedy(gguf_model(family, qtype), weights, PROMPT, RuntimeOptions(dtype="float32", max_seq=128))
    assert got == expected


@pytest.mark.parametrize("family,qtype,weights", [("mixtral", "Q4_K", SPLITS[3]), ("qwen3_moe", "Q8_0", SPLITS[2]),
                                                  ("gemma3", "Q4_K", SPLITS[1])], ids=str)
def test_family_files_kept_quantized_match_transformers(gguf_model, reference, family, qtype, weights):
    """`--dtype gguf`: experts (Mixtral's 3 split by columns over 4 devices, on Q4_K's groups)
    and Gemma's layers kept in their GGUF group forms, computed in float32 (exact): token for
    token the dequantized reference."""
    opts = RuntimeOptions(dtype="gguf", compute_dtype="float32", max_seq=128)
    assert tpi_greedy(gguf_model(family, qtype), weights, PROMPT, opts) == reference(family, qtype)


def test_family_files_read_as_their_families(gguf_model):
    """What the three families' files are read as: the window is shorter than the prompt, the
    expert counts are not multiples of the device counts above."""
    from tpi.weights.gguf_source import GGUFCheckpoint

    gemma = GGUFCheckpoint(gguf_model("gemma3", "Q8_0")).config
    assert gemma.family == "gemma3" and gemma.sliding_window < len(PROMPT)
    assert gemma.layer_types == ("sliding",) * 5 + ("full",) and gemma.local_rope_theta == 10000.0
    assert gemma.attn_scale == 256 ** -0.5 and gemma.norm_offset == 1.0
    scaled = GGUFCheckpoint(gguf_model("gemma3-scaled", "Q4_K")).config
    assert (scaled.rope_scaling.kind, scaled.rope_scaling.factor, scaled.final_logit_softcap) == ("linear", 8.0, 30.0)
    mixtral = GGUFCheckpoint(gguf_model("mixtral", "Q8_0")).config
    qwen = GGUFCheckpoint(gguf_model("qwen3_moe", "Q8_0")).config
    assert (mixtral.family, mixtral.num_experts, mixtral.experts_per_token) == ("mixtral", 3, 2)
    assert (qwen.family, qwen.num_experts, qwen.intermediate_size, qwen.norm_topk_prob) == ("qwen3_moe", 5, 768, True)
    assert all(e % n for e in (3, 5) for n in (2, 4)) and 5 % 3


def test_split_gguf_reads_as_the_single_file(gguf_model, reference, smollm2_gguf):
    from gguf_models import write_gguf
    from tpi.weights.sources import cache_dir

    gguf_model("llama", "Q8_0")
    out = cache_dir() / "gguf-models" / "split" / "llama.gguf"  # a fixed path: its store is rebuilt in place
    out.parent.mkdir(parents=True, exist_ok=True)
    first = write_gguf(gguf_model.hf_dir("llama"), out, "Q8_0", smollm2_gguf, split_max_tensors=8)
    assert first.name == "llama-00001-of-00003.gguf"
    got = tpi_greedy(first, [1.0, 2.0], PROMPT, RuntimeOptions(dtype="float32", max_seq=128))
    assert got == reference("llama", "Q8_0")


def test_q4_k_writer_round_trips_through_gguf_dequantizer():
    """The tests' own Q4_K blocks decode, with the gguf package, to within half a step."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = np.random.default_rng(0).normal(size=(8, 512)).astype(np.float32)
    back = dequantize(quantize_q4_k(w), GGMLQuantizationType.Q4_K)
    step = (w.reshape(-1, 32).max(1) - np.minimum(w.reshape(-1, 32).min(1), 0)) / 15
    assert back.shape == w.shape
    assert (np.abs(back - w).reshape(-1, 32).max(1) <= 0.5 * step + 0.02).all()


def test_tokenizer_equals_transformers_conversion(smollm2_gguf):
    from transformers import AutoTokenizer

    from tpi.tokenizer import ChatTokenizer
    from tpi.weights.gguf_source import GGUFCheckpoint

    files = GGUFCheckpoint(smollm2_gguf).model_files()
    ours = _tokenizer_from(files)
    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    texts = ["What is the capital of France?", "  two spaces\n\nand 12345 digits, émigré café 😀",
             "<|im_start|>user\nhi<|im_end|>", "def f(x):\n\treturn x**2  # ok", "I'm they'll WE'VE"]
    for text in texts:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.encode_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert isinstance(ours, ChatTokenizer) and ours.eos_token == "<|im_end|>"


def _tokenizer_from(files):
    import tempfile
    from pathlib import Path

    from tpi.tokenizer import ChatTokenizer

    d = Path(tempfile.mkdtemp())
    for name, data in files.items():
        (d / name).write_bytes(data)
    return ChatTokenizer(d)


def test_smollm2_from_its_gguf_answers_paris(tmp_path):
    """The embedded default, read from its GGUF file (no conversion), on 3 devices, with the
    default options: a gguf store (its 4-bit tensors kept), float32 activations."""
    from tpi.generation_config import load_generation_config
    from tpi.weights.sources import resolve_source

    assert resolve_source(None).suffix == ".gguf"
    engine = build_inproc_engine(ModelSettings(None, [1.0, 1.0, 1.0]), RuntimeOptions(max_seq=256))
    try:
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        assert engine.store.dtype == "gguf" and engine.cluster.runners[0].dtype == torch.float32
        out = engine.generator.generate(prompt, SamplingParams(max_new_tokens=24))
        assert "Paris" in engine.tokenizer.decode(out.tokens)
        # the reply ends at <|im_end|> (2), its eos and its only end-of-turn control token
        assert engine.generator.stop_ids == {2} and out.finish_reason == "stop"
        # no generation settings in a GGUF file: greedy, as transformers derives them from a config
        assert load_generation_config(engine.store.model_dir).temperature == 0.0
        source = resolve_source(None)
        assert engine.store.manifest["source_sha256"] == {source.name: hashlib.sha256(source.read_bytes()).hexdigest()}
    finally:
        engine.close()
