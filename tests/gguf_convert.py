"""A Hugging Face checkpoint in the form llama.cpp's convert_hf_to_gguf.py gives it (names from
the `gguf` package's own tensor map, not TPI's reader; q/k rows of llama files permuted;
experts stacked one 3-D tensor per kind; 1 added to Gemma's norms; the metadata keys), and
back again for a reference transformers cannot load from GGUF itself. Imported by tests.
"""
from __future__ import annotations

import re

import numpy as np
import torch

# Hugging Face architecture -> GGUF general.architecture
ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
        "MixtralForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3moe", "Gemma3ForCausalLM": "gemma3"}
EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def gguf_arch(cfg: dict) -> str:
    return ARCH[cfg["architectures"][0]]


def _name_map(cfg: dict):
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch(cfg)]
    return gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])


def _heads(cfg: dict) -> tuple[int, int, int]:
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    return heads, kv, cfg.get("head_dim") or cfg["hidden_size"] // heads


def rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    return float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def gguf_metadata(cfg: dict) -> dict:
    """The hyperparameter keys llama.cpp's converter writes for `cfg`."""
    arch = gguf_arch(cfg)
    heads, kv, head_dim = _heads(cfg)
    meta = {f"{arch}.block_count": cfg["num_hidden_layers"], f"{arch}.context_length": cfg["max_position_embeddings"],
            f"{arch}.embedding_length": cfg["hidden_size"], f"{arch}.feed_forward_length": cfg["intermediate_size"],
            f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv,
            f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
            f"{arch}.rope.freq_base": rope_theta(cfg),
            f"{arch}.rope.dimension_count": head_dim, f"{arch}.vocab_size": cfg["vocab_size"]}
    if cfg.get("head_dim"):  # llama.cpp writes an explicit head dim as the key / value length
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = cfg["head_dim"]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        meta[f"{arch}.expert_count"] = experts
        meta[f"{arch}.expert_used_count"] = cfg["num_experts_per_tok"]
    if cfg.get("moe_intermediate_size"):
        meta[f"{arch}.expert_feed_forward_length"] = cfg["moe_intermediate_size"]
    if arch == "gemma3" and cfg.get("sliding_window"):
        meta[f"{arch}.attention.sliding_window"] = cfg["sliding_window"]
    full = (cfg.get("rope_parameters") or {}).get("full_attention") or {}
    if full.get("rope_type") == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(full["factor"])
    if cfg.get("final_logit_softcapping"):
        meta[f"{arch}.final_logit_softcapping"] = float(cfg["final_logit_softcapping"])
    return meta


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute`."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: dict, tensors: dict[str, torch.Tensor], legacy_experts: bool = False) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> GGUF name -> float32 array, as the converter writes them (with
    `legacy_experts`, as it wrote Mixtral before April 2024: blk.N.ffn_gate.E.weight, one per expert)."""
    arch, names = gguf_arch(cfg), _name_map(cfg)
    heads, kv, _ = _heads(cfg)
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for hf, t in tensors.items():
        data = t.float().numpy()
        m = EXPERT_RE.match(hf)
        if m:  # model.layers.N.block_sparse_moe.experts.E.w1 -> one stack per layer and kind
            stacks.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = data
            continue
        base, suffix = hf.rsplit(".", 1)
        if names.get_name(base) is None:
            raise ValueError(f"the gguf package has no {arch} name for {hf}")
        name = f"{names.get_name(base)}.{suffix}"
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            data = permute(data, heads if ".attn_q." in name else kv)
        if arch == "gemma3" and hf.endswith("norm.weight"):
            data = data + np.float32(1.0)
        out[name] = data
    for base, per in stacks.items():
        if legacy_experts:
            out.update({f"{names.get_name(base).removesuffix('_exps')}.{e}.weight": w for e, w in per.items()})
        else:
            out[f"{names.get_name(base)}.weight"] = np.stack([per[e] for e in range(len(per))])  # (E, rows, width)
    return out


def hf_state_from_gguf(path, cfg: dict, hf_names: list[str]) -> dict[str, torch.Tensor]:
    """The GGUF file dequantized by the `gguf` package (GGUFReader, gguf.quants.dequantize),
    converted back to Hugging Face names (`hf_names`, mapped with the gguf package's table):
    q/k rows unpermuted, experts unstacked (or one tensor each), Gemma's norms less 1."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    arch, names = gguf_arch(cfg), _name_map(cfg)
    heads, kv, _ = _heads(cfg)
    data = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in GGUFReader(str(path)).tensors}
    out = {}
    for hf in hf_names:
        m = EXPERT_RE.match(hf)
        if m:
            stack, e = names.get_name(m.group(1) + "." + m.group(3)), int(m.group(2))
            w = data[f"{stack}.weight"][e] if f"{stack}.weight" in data else data[f"{stack.removesuffix('_exps')}.{e}.weight"]
        else:
            base, suffix = hf.rsplit(".", 1)
            name = f"{names.get_name(base)}.{suffix}"
            w = data[name]
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                w = unpermute(w, heads if ".attn_q." in name else kv)
            if arch == "gemma3" and hf.endswith("norm.weight"):
                w = w - np.float32(1.0)
        out[hf] = torch.from_numpy(np.ascontiguousarray(w))
    return out
