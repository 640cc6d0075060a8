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
}
# Gate activations of the gated MLP: HF `hidden_act` / `hidden_activation` -> our name.
ACTIVATIONS = {"silu": "silu"}


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
    qk_norm: bool = False      # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    hidden_act: str = "silu"   # the MLP gate's activation (tpi.model.layers.ACTIVATIONS)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
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
    scaling = _parse_rope_scaling(hf.get("rope_scaling") or hf.get("rope_parameters"), arch)
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    sliding = None
    if family == "mistral":
        sliding = hf.get("sliding_window")
    elif family == "qwen2" and hf.get("use_sliding_window"):
        sliding = hf.get("sliding_window")
    elif family == "qwen3" and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{arch} with use_sliding_window: not supported (no released Qwen3 uses it)")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig(
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
        qk_norm=family == "qwen3",
        hidden_act=ACTIVATIONS[act],
    )


def _parse_rope_scaling(rs: dict | None, arch: str) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"{arch} with rope_scaling of type {kind!r}: only llama3 is supported")
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )
