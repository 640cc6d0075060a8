"""What differs between the GGUF architectures TPI reads: tensor names, llama.cpp's changes to
the weights, and the Hugging Face config fields beyond the common ones (pure, no I/O).

Learned from llama.cpp's convert_hf_to_gguf.py and its model loader (llama-model.cpp), and
checked against transformers' GGUF loader where it reads the architecture:

- llama: q/k rows permuted (see tpi.weights.gguf_source). With `llama.expert_count` > 0 it is
  Mixtral: the router is `ffn_gate_inp`, each layer's experts are one 3-D tensor per kind,
  `ffn_{gate,up,down}_exps` (expert, rows, width), from Mixtral's w1 / w3 / w2. llama.cpp
  always renormalises Mixtral's top-k weights (as transformers does). Files converted before
  April 2024 hold one tensor per expert instead, `ffn_{gate,up,down}.E` (llama.cpp still loads them).
- qwen3moe: q/k not permuted; experts stacked likewise; the expert width is
  `expert_feed_forward_length` (`feed_forward_length` is the dense width). llama.cpp's graph
  renormalises the top-k weights, and its converter writes no key for it (it reads
  `expert_weights_norm` where present): so norm_topk_prob is that key, else true, as in
  transformers' GGUF loader. Every block is a mixture: the gguf package's QWEN3MOE tensor
  table has no dense MLP tensors (so no file holds Qwen3-MoE's mlp_only_layers).
- gemma3: the converter adds 1 to every `*norm.weight` (Gemma's RMSNorm multiplies by
  1 + w): `NORM_SHIFT` is subtracted again on reading. Its norms are named differently
  (`post_attention_norm`, `ffn_norm` = pre-feedforward, `post_ffw_norm`). The file carries no
  layer pattern, local RoPE base or attention scale: llama.cpp fixes them (every 6th layer
  global if `gemma3.attention.sliding_window` is set, else none sliding; local RoPE base 10000
  unless `gemma3.rope.freq_base_swa`; attention scale 1/sqrt(head_dim), 1/sqrt(hidden/heads)
  at 62 layers, the 27B, as Google's reference does). The embedding scale sqrt(hidden) is part
  of the architecture, not of the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tpi.config import UnsupportedModelError

# GGUF tensor suffix in a block -> Hugging Face suffix in model.layers.N (the Llama names)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
DENSE_MLP = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
EXPERT_KINDS = ("gate", "up", "down")   # ffn_{kind}_exps: (experts, w, H) for gate/up, (experts, H, w) for down
NORM_SHIFT = 1.0                        # what llama.cpp adds to Gemma's norm weights
GEMMA3_SWA_PERIOD = 6                   # llama.cpp: layer i is global iff i % 6 == 5
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_27B_LAYERS = 62


@dataclass(frozen=True)
class Family:
    """One GGUF architecture as TPI reads it."""
    hf_architecture: str
    model_type: str
    permuted: bool                                   # q/k rows interleaved by llama.cpp
    names: dict = field(default_factory=dict)        # GGUF block suffix -> HF suffix (over LAYER_NAMES)
    router: str | None = None                        # HF suffix of ffn_gate_inp.weight
    experts: dict = field(default_factory=dict)      # kind -> HF suffix with {e}
    norm_shift: float = 0.0                          # subtracted from every *norm.weight
    config: Callable[["Meta", int], dict] | None = None  # extra HF config fields (meta, layers)

    def layer_names(self) -> dict[str, str]:
        names = {**LAYER_NAMES, **self.names}
        if self.experts:  # no dense MLP in a block (neither llama.cpp nor the gguf package's table has one)
            names = {k: v for k, v in names.items() if k not in DENSE_MLP}
        return names


class Meta:
    """`{arch}.key` lookups in a file's metadata, with the error for a missing one."""

    def __init__(self, metadata: dict, arch: str, where: str, error: type[Exception]):
        self.metadata, self.arch, self.where, self.error = metadata, arch, where, error

    def get(self, key: str, default=None):
        return self.metadata.get(f"{self.arch}.{key}", default)

    def required(self, key: str):
        value = self.get(key)
        if value is None:
            raise self.error(f"{self.where}: metadata {self.arch}.{key} is missing")
        return value


def _experts(m: Meta, count_key: str) -> dict:
    return {count_key: int(m.required("expert_count")), "num_experts_per_tok": int(m.required("expert_used_count"))}


def _mixtral(m: Meta, layers: int) -> dict:
    return _experts(m, "num_local_experts")


def _qwen3_moe(m: Meta, layers: int) -> dict:
    return {**_experts(m, "num_experts"), "moe_intermediate_size": int(m.required("expert_feed_forward_length")),
            "norm_topk_prob": bool(m.get("expert_weights_norm", True)), "decoder_sparse_step": 1}


def _gemma3(m: Meta, layers: int) -> dict:
    hidden, heads = int(m.required("embedding_length")), int(m.required("attention.head_count"))
    head_dim = int(m.get("attention.key_length", 256))  # the converter's default, as Gemma's config
    window = m.get("attention.sliding_window")
    if window:
        types = ["full_attention" if i % GEMMA3_SWA_PERIOD == GEMMA3_SWA_PERIOD - 1 else "sliding_attention"
                 for i in range(layers)]
    else:
        types = ["full_attention"] * layers
    scaling = m.get("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise UnsupportedModelError(f"{m.where}: Gemma 3 with RoPE scaling {scaling!r}: only linear is supported")
    full = {"rope_type": "default", "rope_theta": float(m.get("rope.freq_base", 1_000_000.0))}
    if scaling == "linear":  # llama.cpp applies it to the global layers only
        full.update(rope_type="linear", factor=float(m.required("rope.scaling.factor")))
    local = {"rope_type": "default", "rope_theta": float(m.get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))}
    cap = m.get("final_logit_softcapping")
    return {"hidden_activation": "gelu_pytorch_tanh", "head_dim": head_dim, "sliding_window": window or None,
            "query_pre_attn_scalar": hidden // heads if layers == GEMMA3_27B_LAYERS else head_dim,
            "layer_types": types, "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "final_logit_softcapping": None if not cap else float(cap), "attn_logit_softcapping": None}


LLAMA = Family("LlamaForCausalLM", "llama", permuted=True)
MIXTRAL = Family("MixtralForCausalLM", "mixtral", permuted=True, router="block_sparse_moe.gate.weight",
                 experts={"gate": "block_sparse_moe.experts.{e}.w1.weight", "up": "block_sparse_moe.experts.{e}.w3.weight",
                          "down": "block_sparse_moe.experts.{e}.w2.weight"},
                 config=_mixtral)
FAMILIES = {
    "llama": LLAMA,
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", permuted=False),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", permuted=False),
    "qwen3moe": Family("Qwen3MoeForCausalLM", "qwen3_moe", permuted=False, router="mlp.gate.weight",
                       experts={k: f"mlp.experts.{{e}}.{k}_proj.weight" for k in EXPERT_KINDS}, config=_qwen3_moe),
    "gemma3": Family("Gemma3ForCausalLM", "gemma3_text", permuted=False, norm_shift=NORM_SHIFT, config=_gemma3,
                     names={"post_attention_norm.weight": "post_attention_layernorm.weight",
                            "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                            "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}),
}


def family_of(arch: str | None, metadata: dict) -> Family | None:
    """The family of a file: its architecture, and for llama whether it has experts (Mixtral)."""
    if arch == "llama" and metadata.get("llama.expert_count"):
        return MIXTRAL
    return FAMILIES.get(arch)
