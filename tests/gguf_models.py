"""Write a Hugging Face checkpoint as a GGUF file the way llama.cpp's converter does, with
the `gguf` package (tests/gguf_convert.py: metadata, names, permuted q/k rows of llama models,
stacked experts, Gemma's shifted norms; F16 / Q8_0 / Q4_K tensors),
and load a GGUF with transformers (the reference). Imported by tests (like reference.py).

`gguf.quants` quantizes F16 and Q8_0 but has no Q4_K quantizer, so `quantize_q4_k` below
writes Q4_K blocks (plain min/max per sub-block of 32, not llama.cpp's search: the format is
what matters here); tests/engine/test_gguf.py checks it against gguf's own dequantizer.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gguf_convert import gguf_arch, gguf_metadata, gguf_tensors

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 (rows, width % 256 == 0) -> Q4_K blocks, uint8 (rows, width / 256 * 144)."""
    rows, width = w.shape
    x = w.astype(np.float32).reshape(-1, 8, 32)                           # (blocks, sub-blocks, 32)
    lo = np.minimum(x.min(axis=2), 0.0)                                   # (blocks, 8) <= 0
    scale = (x.max(axis=2) - lo) / 15.0                                   # (blocks, 8)
    d = (scale.max(axis=1) / 63.0).astype(np.float16)                     # (blocks,)
    dmin = ((-lo).max(axis=1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(-lo, dmin32, out=np.zeros_like(lo), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    step, offset = (d32 * sc)[:, :, None], (dmin32 * mn)[:, :, None]
    q = np.clip(np.round(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), dtype=np.uint8)                   # 6-bit scales and mins, packed
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)                # sub-blocks 2c, 2c+1 share bytes
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return blocks.reshape(rows, width // 256 * 144)


def quantized(w: np.ndarray, qtype: str):
    """(data, raw GGML type) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from gguf.quants import quant_shape_to_byte_shape

    t = GGMLQuantizationType[qtype]
    if qtype == "Q4_K":  # a stack of experts (E, rows, width) as E * rows rows
        return quantize_q4_k(w.reshape(-1, w.shape[-1])).reshape(*w.shape[:-1], -1), t
    try:
        return quantize(w, t), t
    except NotImplementedError:  # a type gguf cannot write: zero blocks of the right size (for refusals)
        return np.zeros(quant_shape_to_byte_shape(w.shape, t), dtype=np.uint8), t


def write_gguf(hf_dir: Path, out: Path, qtype: str, tokenizer_from: Path, norms: str = "F32",
               metadata: dict | None = None, types: dict | None = None, split_max_tensors: int = 0,
               drop: tuple[str, ...] = (), legacy_experts: bool = False) -> Path:
    """`hf_dir`'s safetensors model as a GGUF file at `out`: 2-D weights in `qtype` (or
    `types[gguf name]`), 1-D tensors in `norms`; the tokenizer metadata copied from the GGUF
    file `tokenizer_from`; with `legacy_experts` one tensor per expert (tests/gguf_convert.py);
    `metadata` overrides keys and `drop` leaves tensors out (to make bad files). With
    `split_max_tensors`, a split model (OUT-00001-of-0000N.gguf, ...): returns its first part."""
    import gguf
    from safetensors.torch import load_file

    from tpi.weights.gguf_file import GGUFFile

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = gguf_arch(cfg)
    meta = gguf_metadata(cfg)
    tok_meta = GGUFFile(tokenizer_from).metadata
    meta.update({k: tok_meta[k] for k in TOKENIZER_KEYS if k in tok_meta})
    meta.update(metadata or {})
    w = gguf.GGUFWriter(str(out), meta.pop("general.architecture", arch), split_max_tensors=split_max_tensors)
    for key, value in meta.items():
        _add(w, key, value)
    for name, data in gguf_tensors(cfg, load_file(str(hf_dir / "model.safetensors")), legacy_experts).items():
        if name in drop:
            continue
        # llama.cpp keeps 1-D tensors and the router (ffn_gate_inp) in F32
        kind = (types or {}).get(name, norms if data.ndim == 1 else "F32" if ".ffn_gate_inp." in name else qtype)
        if kind == "F32":
            w.add_tensor(name, data.astype(np.float32))
        elif kind == "F16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            q, raw = quantized(data, kind)
            w.add_tensor(name, q, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(out)[0] if split_max_tensors else out


def _add(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


# What transformers cannot load from a GGUF file: a Mixtral file is a llama file with experts,
# which transformers' GGUF loader reads as a dense Llama (it maps no expert tensors); a Gemma 3
# with linear RoPE scaling (4B and up), whose gemma3.rope.scaling.* it does not read.
NO_HF_GGUF_LOADER = {"MixtralForCausalLM"}


def hf_loads_gguf(cfg: dict) -> bool:
    full = (cfg.get("rope_parameters") or {}).get("full_attention") or {}
    return cfg["architectures"][0] not in NO_HF_GGUF_LOADER and full.get("rope_type", "default") == "default"


def hf_from_gguf(path: Path, hf_dir: Path | None = None):
    """The reference, dequantized, float32: transformers' own GGUF loader; for an architecture
    it cannot load (NO_HF_GGUF_LOADER), transformers' own model class (config from `hf_dir`, the
    model the file was written from) with the state dict the `gguf` package dequantizes from
    the file, converted back by tests/gguf_convert.py."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((hf_dir / "config.json").read_text()) if hf_dir else {}
    if not cfg or hf_loads_gguf(cfg):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return model.eval()
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    from gguf_convert import hf_state_from_gguf

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        save_file(hf_state_from_gguf(path, cfg, names), str(Path(d) / "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return model.eval()


def hf_greedy_gguf(path: Path, prompt: list[int], new_tokens: int, hf_dir: Path | None = None) -> list[int]:
    model = hf_from_gguf(path, hf_dir)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# Llama-family shapes whose widths are whole Q4_K blocks (256); heads of 32 dims.
GGUF_FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=512,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
                       intermediate_size=768, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                       tie_word_embeddings=True),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=256, intermediate_size=512,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                  use_sliding_window=False),
    # transformers reads no head dim from a qwen3 GGUF (Qwen3Config's default, 128, is used):
    # so 128 here, which is not hidden / heads (64)
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=256, intermediate_size=512,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                  tie_word_embeddings=True, use_sliding_window=False),
    # Gemma 3 as llama.cpp runs it: every 6th layer global, local RoPE base 10000, attention
    # scaled by head_dim (transformers' GGUF loader takes the default query_pre_attn_scalar,
    # 256: so head_dim 256, as Gemma 3 1B-12B have); a window of 8, shorter than the prompts.
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=256,
                   intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
                   hidden_activation="gelu_pytorch_tanh",
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Gemma 3 4B-27B's global layers: linear RoPE scaling (factor 8), and a final logit softcap
    "gemma3-scaled": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=256,
                          intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=256, query_pre_attn_scalar=256, sliding_window=8, final_logit_softcapping=30.0,
                          hidden_activation="gelu_pytorch_tanh",
                          rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Experts: 3 (more devices than experts on 4: split by columns; 2 do not divide it) and 5
    # (no device count here divides it). Qwen3-MoE's expert width is 30B-A3B's, 768, because
    # transformers' GGUF loader reads no expert_feed_forward_length (its default is 768).
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=256,
                    intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                    num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=False),
    "mixtral-legacy": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=256,
                           intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=256,
                      intermediate_size=512, moe_intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=5,
                      num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False),
}


def make_hf_model(family: str, out: Path, init_range: float = 0.1) -> Path:
    """A random-weight Hugging Face model of GGUF_FAMILIES[family] (SmolLM2's vocabulary size)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads(json.dumps(GGUF_FAMILIES[family]))  # a deep copy
    spec.update(vocab_size=49152, rms_norm_eps=1e-5, initializer_range=init_range,
                bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    if "hidden_activation" not in spec:
        spec.update(hidden_act="silu", rope_theta=10000.0)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(4321)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
            elif name.endswith("norm.weight"):  # not all ones: a wrong norm mapping must show
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    return out
