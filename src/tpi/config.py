"""Model configuration, read once from a Hugging Face `config.json` into a frozen dataclass."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Architectures whose maths `tpi.model` implements: the Llama family and its relatives.
# A family's differences are fields of ModelConfig (read here) and rows of the slicing table
# (tpi.weights.slicing), not branches in the model code.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# Gate activations of the gated MLP: HF `hidden_act` / `hidden_activation` -> our name.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture (or variant) TPI cannot run."""


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of type llama3 (Llama 3.1 / 3.2) or linear (positions divided by
    `factor`, Gemma 3's global layers). Other types are refused."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0
    kind: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    architecture: str          # e.g. "LlamaForCausalLM"
    family: str                # "llama" | "mistral" | "qwen2" | "qwen3" | ...
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int             # query heads
    num_kv_heads: int          # key/value heads (grouped-query attention)
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool       # q/k/v projections carry biases (Qwen2)
    o_bias: bool               # o_proj carries a bias (rare Llama variants)
    mlp_bias: bool             # gate/up/down carry biases (rare Llama variants)
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False      # per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3)
    hidden_act: str = "silu"   # the MLP gate's activation (tpi.model.layers.ACTIVATIONS)
    # Gemma 3
    norm_offset: float = 0.0   # RMSNorm scales by (norm_offset + w), in float32 (Gemma: 1)
    sandwich_norms: bool = False  # the attention and MLP outputs are normed too (after the all-reduce)
    embed_scale: float | None = None  # embeddings are multiplied by this (Gemma: sqrt(hidden))
    attn_scale: float | None = None   # softmax scale of q.k (None: head_dim ** -0.5)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    layer_types: tuple[str, ...] = ()  # per layer "sliding" | "full"; () : all "sliding" if sliding_window
    local_rope_theta: float | None = None  # RoPE base of the sliding layers (no scaling there)
    # Mixture of experts (Mixtral, Qwen3-MoE): a sparse layer's MLP is `num_experts` gated MLPs of
    # width `intermediate_size`, of which a router picks `experts_per_token` per token.
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = False  # the chosen experts' weights are renormalised to sum to 1
    # Layers of a mixture of experts whose MLP is one dense gated MLP of width
    # `dense_intermediate_size` (Qwen3-MoE's mlp_only_layers and decoder_sparse_step).
    dense_layers: tuple[int, ...] = ()
    dense_intermediate_size: int = 0

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def layer_type(self, layer: int) -> str:
        """'sliding' (attends to the last `sliding_window` positions) or 'full'."""
        if self.layer_types:
            return self.layer_types[layer]
        return "sliding" if self.sliding_window else "full"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse(self, layer: int) -> bool:
        """Whether `layer`'s MLP is the mixture of experts (else a dense gated MLP)."""
        return self.is_moe and layer not in self.dense_layers

    def window(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == "sliding" else None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        data["layer_types"] = tuple(data.get("layer_types", ()))
        data["dense_layers"] = tuple(data.get("dense_layers", ()))
        return cls(**data)


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return parse_hf_config(json.loads(path.read_text()))


def parse_hf_config(hf: dict) -> ModelConfig:
    """Translate a Hugging Face config dict; refuse anything we would compute wrongly."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else f"(model_type={hf.get('model_type')!r})"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch}; TPI runs "
            + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"{arch} with hidden_act={act!r}: supported are {', '.join(ACTIVATIONS)}")
    num_heads = hf["num_attention_heads"]
    num_kv = hf.get("num_key_value_heads") or num_heads
    if num_heads % num_kv:
        raise UnsupportedModelError(f"{num_heads} query heads are not a multiple of {num_kv} KV heads")
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // num_heads
    rope = hf.get("rope_scaling") or hf.get("rope_parameters")
    if family == "gemma3":  # one RoPE per layer type; the global layers' is the model's
        rope = (hf.get("rope_parameters") or {}).get("full_attention") or hf.get("rope_scaling")
    scaling = _parse_rope_scaling(rope, arch)
    rope_theta = hf.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
    sliding = None
    if family == "mistral":
        sliding = hf.get("sliding_window")
    elif family == "qwen2" and hf.get("use_sliding_window"):
        sliding = hf.get("sliding_window")
    elif family in ("qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{arch} with use_sliding_window: not supported (no released Qwen3 uses it)")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    fields = dict(
        architecture=arch,
        family=family,
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        vocab_size=hf["vocab_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        rope_scaling=scaling,
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        hidden_act=ACTIVATIONS[act],
    )
    if family in FAMILY_FIELDS:
        fields.update(FAMILY_FIELDS[family](hf, arch))
    return ModelConfig(**fields)


def _gemma3_fields(hf: dict, arch: str) -> dict:
    """Gemma 3 text models: (1 + w) norms around attention and MLP, scaled embeddings, q/k
    norm, query_pre_attn_scalar, sliding layers interleaved with global ones (own RoPE base)."""
    if hf.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(f"{arch} with attn_logit_softcapping: not supported (Gemma 3 sets none)")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{arch} with use_bidirectional_attention: only causal attention is supported")
    types = hf.get("layer_types") or ["full_attention"] * hf["num_hidden_layers"]
    kinds = {"sliding_attention": "sliding", "full_attention": "full"}
    if any(t not in kinds for t in types):
        raise UnsupportedModelError(f"{arch} with layer types {sorted(set(types))}: only sliding/full attention")
    local = ((hf.get("rope_parameters") or {}).get("sliding_attention") or {})
    if (local.get("rope_type") or "default") != "default":
        raise UnsupportedModelError(f"{arch}: sliding layers with RoPE of type {local['rope_type']!r}")
    cap = hf.get("final_logit_softcapping")
    return dict(
        qk_norm=True, norm_offset=1.0, sandwich_norms=True,
        embed_scale=float(hf["hidden_size"]) ** 0.5,
        attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
        final_logit_softcap=None if cap is None else float(cap),
        sliding_window=hf.get("sliding_window"),
        layer_types=tuple(kinds[t] for t in types),
        local_rope_theta=float(local.get("rope_theta") or hf.get("rope_local_base_freq") or 10000.0),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _mixtral_fields(hf: dict, arch: str) -> dict:
    """Mixtral: every layer sparse, the chosen experts' weights always renormalised."""
    return dict(num_experts=int(hf["num_local_experts"]), experts_per_token=int(hf["num_experts_per_tok"]),
                norm_topk_prob=True, sliding_window=hf.get("sliding_window"))


def _qwen3_moe_fields(hf: dict, arch: str) -> dict:
    """Qwen3-MoE: experts of width moe_intermediate_size; renormalised if norm_topk_prob.
    Layer i is sparse as transformers' Qwen3MoeDecoderLayer decides: i not in mlp_only_layers
    and (i + 1) % decoder_sparse_step == 0; the others have a dense MLP of intermediate_size.
    With no sparse layer at all (or no experts) the model is a dense one."""
    L = hf["num_hidden_layers"]
    step = 1 if hf.get("decoder_sparse_step") is None else hf["decoder_sparse_step"]
    if not isinstance(step, int) or step < 1:
        raise UnsupportedModelError(f"{arch} with decoder_sparse_step={step!r}: it must be a positive integer")
    experts = int(hf.get("num_experts", hf.get("num_local_experts")) or 0)
    only = set(hf.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(L) if i in only or (i + 1) % step or not experts)
    if len(dense) == L:  # no sparse layer: every MLP is the dense one, as in a dense Qwen3
        return {}
    return dict(num_experts=experts, experts_per_token=int(hf["num_experts_per_tok"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                intermediate_size=int(hf["moe_intermediate_size"]),
                dense_layers=dense, dense_intermediate_size=int(hf["intermediate_size"]) if dense else 0)


# family -> its fields beyond the Llama ones, from the HF config (each a small function)
FAMILY_FIELDS = {"gemma3": _gemma3_fields, "mixtral": _mixtral_fields, "qwen3_moe": _qwen3_moe_fields}


def _parse_rope_scaling(rs: dict | None, arch: str) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(factor=float(rs["factor"]), kind="linear")
    if kind != "llama3":
        raise UnsupportedModelError(f"{arch} with rope_scaling of type {kind!r}: only llama3 and linear are supported")
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )
