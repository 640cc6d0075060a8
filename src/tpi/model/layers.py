"""Building blocks: RMSNorm, rotary embeddings (with llama3 scaling), gated MLP, linear.

Conventions follow Hugging Face's Llama so that outputs match it bit for bit in float32
where the operation order allows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tpi.config import ModelConfig
from tpi.weights.quant import QUANTIZED_KINDS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale. With an offset (Gemma):
    scale by (offset + w) in float32, then cast back."""
    dtype = x.dtype
    # torch's fused kernel: the same bits as x * rsqrt(mean(x^2) + eps) in float32 (checked
    # over sizes 64-8192 in float32, bfloat16, float16), in 2 operations instead of 6
    h = F.rms_norm(x.to(torch.float32), x.shape[-1:], eps=eps)
    if offset:
        return (h * (offset + weight.float())).to(dtype)
    return weight * h.to(dtype)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias. A quantized weight (tpi.weights.quant: the
    kernel forms Int8Weight / Int4Weight, or a QuantizedWeight) computes in x's dtype."""
    if isinstance(weight, QUANTIZED_KINDS):
        return weight.linear(x, bias)
    return F.linear(x, weight, bias)


def rope_inv_freq(cfg: ModelConfig, layer_type: str = "full") -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), float32, of the layers of `layer_type`: the model's
    base with llama3 or linear scaling if configured; a sliding layer of a model with its own
    local base (Gemma 3) uses that base, unscaled."""
    dim = cfg.head_dim
    local = layer_type == "sliding" and cfg.local_rope_theta is not None
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = None if local else cfg.rope_scaling
    if rs is None:
        return inv_freq
    if rs.kind == "linear":
        return inv_freq / rs.factor
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """The rotary tables for integer positions (B, T): cos and the signed sin that
    `apply_rope` takes, each (B, 1, T, head_dim) (one row per position, shared by the heads)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                     # (B, T, hd)
    sin = emb.sin()
    half = sin.shape[-1] // 2
    sin[..., :half].neg_()                                      # (-sin, sin): see apply_rope
    return emb.cos().to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, hd); cos, signed_sin: (B, 1, T, hd) from rope_cos_sin. HF's
    x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1): here (x2, x1) (one roll)
    times (-sin, sin), which is the same bits (negation is exact) in four operations."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


# The gate activations of the gated MLP (ModelConfig.hidden_act).
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def gated(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up: SwiGLU for silu."""
    return ACTIVATIONS[act](gate) * up
