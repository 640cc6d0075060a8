"""Write a Hugging Face checkpoint as a GGUF file the way llama.cpp's converter does, with
the `gguf` package (metadata, permuted q/k rows of llama models, F16 / Q8_0 / Q4_K tensors),
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

from tpi.weights.gguf_source import HEAD_NAMES, LAYER_NAMES

# Hugging Face name -> GGUF name: the inverse of the reader's table (a wrong row would still
# show: the reference is transformers reading the same file with its own table).
GGUF_NAMES = {hf: g for g, hf in LAYER_NAMES.items()}
HEAD = {hf: g for g, hf in HEAD_NAMES.items()}
ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


def gguf_name(hf: str) -> str:
    if hf in HEAD:
        return HEAD[hf]
    _, _, layer, suffix = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[suffix]}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
    if qtype == "Q4_K":
        return quantize_q4_k(w), t
    try:
        return quantize(w, t), t
    except NotImplementedError:  # a type gguf cannot write: zero blocks of the right size (for refusals)
        return np.zeros(quant_shape_to_byte_shape(w.shape, t), dtype=np.uint8), t


def write_gguf(hf_dir: Path, out: Path, qtype: str, tokenizer_from: Path, norms: str = "F32",
               metadata: dict | None = None, types: dict | None = None, split_max_tensors: int = 0) -> Path:
    """`hf_dir`'s safetensors model as a GGUF file at `out`: 2-D weights in `qtype` (or
    `types[gguf name]`), 1-D tensors in `norms`; the tokenizer metadata copied from the GGUF
    file `tokenizer_from`; `metadata` overrides keys (to make bad files). With
    `split_max_tensors`, a split model (OUT-00001-of-0000N.gguf, ...): returns its first part."""
    import gguf
    from safetensors.torch import load_file

    from tpi.weights.gguf_file import GGUFFile

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = ARCH[cfg["architectures"][0]]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    meta = {f"{arch}.block_count": cfg["num_hidden_layers"], f"{arch}.context_length": cfg["max_position_embeddings"],
            f"{arch}.embedding_length": cfg["hidden_size"], f"{arch}.feed_forward_length": cfg["intermediate_size"],
            f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv,
            f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
            f"{arch}.rope.freq_base": float(cfg.get("rope_theta", 10000.0)),
            f"{arch}.rope.dimension_count": head_dim, f"{arch}.vocab_size": cfg["vocab_size"]}
    if cfg.get("head_dim"):  # llama.cpp writes an explicit head dim as the key / value length
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = cfg["head_dim"]
    tok_meta = GGUFFile(tokenizer_from).metadata
    meta.update({k: tok_meta[k] for k in TOKENIZER_KEYS if k in tok_meta})
    meta.update(metadata or {})
    w = gguf.GGUFWriter(str(out), meta.pop("general.architecture", arch), split_max_tensors=split_max_tensors)
    for key, value in meta.items():
        _add(w, key, value)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    for hf, t in tensors.items():
        name = gguf_name(hf)
        data = t.float().numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            data = permute(data, heads if ".attn_q." in name else kv)
        kind = (types or {}).get(name, qtype if data.ndim == 2 else norms)
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


def hf_from_gguf(path: Path):
    """transformers' own GGUF loader: the model dequantized, float32 (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def hf_greedy_gguf(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = hf_from_gguf(path)
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
}


def make_hf_model(family: str, out: Path, init_range: float = 0.1) -> Path:
    """A random-weight Hugging Face model of GGUF_FAMILIES[family] (SmolLM2's vocabulary size)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(GGUF_FAMILIES[family])
    spec.update(vocab_size=49152, rms_norm_eps=1e-5, hidden_act="silu", initializer_range=init_range,
                bos_token_id=1, eos_token_id=2, max_position_embeddings=512, rope_theta=10000.0)
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
