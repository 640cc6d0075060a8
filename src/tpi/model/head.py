"""The master's own weights: token embedding, final norm and output head.

These never leave the master: token ids go in, hidden states go to the shards,
logits come out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tpi.config import ModelConfig
from tpi.model.layers import rms_norm


class Head:
    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype):
        self.cfg, self.dtype = cfg, compute_dtype
        self.embed_table = tensors["embed"]                       # (vocab, H)
        self.final_norm = tensors["final_norm"]                   # (H,)
        self.lm_head = tensors.get("lm_head", self.embed_table)   # (vocab, H); tied if absent

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> hidden (B, T, H) in the compute dtype."""
        return F.embedding(ids, self.embed_table).to(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, H) of the last position -> float32 logits (B, vocab)."""
        h = rms_norm(hidden.to(self.dtype), self.final_norm.to(self.dtype), self.cfg.rms_norm_eps)
        return F.linear(h, self.lm_head.to(self.dtype) if self.lm_head.dtype != self.dtype else self.lm_head).float()
