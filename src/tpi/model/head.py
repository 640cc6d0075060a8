"""The output head, split by vocabulary across devices, and its candidates.

No device holds the whole output head (Llama-3.1-70B's is 128256 x 8192, 2.1 GB in bfloat16).
Device r holds the rows of its token ids (`DeviceShard.vocab`), in pieces. After the last
layer every device has the same hidden states (the result of the last all-reduce), so each
scores its own rows locally and keeps its top K (values and global token ids). The
candidates of all N devices go to the master only, in ONE gather of a float32 tensor

    packed (R, 2, K): packed[:, 0] = this device's K best logits, packed[:, 1] = their ids

which the master receives stacked (N, R, 2, K) (ids below 2^24 are exact in float32; a
gather always travels in float32 whatever the wire dtype). No worker receives anything
back, so the candidates and the chosen token stay on the master. It scatters the N*K
candidates into a full-vocabulary row of -inf and samples from it as from full logits:

* greedy, and top-k sampling with k <= K: exactly the full head's choice (the global top k
  are among the candidates: each is in its own device's top K);
* temperature / top-p without a top-k cut: the softmax is over the N*K candidates only, so
  the tokens outside every device's top K (probability mass far below the candidates' when
  K = 128) can never be sampled. That is the approximation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tpi.config import ModelConfig
from tpi.model.layers import linear, rms_norm

DEFAULT_TOPK = 128
RESCORE_BYTES = 1 << 19  # float32 head rows one rescoring step converts (see `rescored`)


def head_topk(vocab_sizes: list[int], wanted: int = DEFAULT_TOPK) -> int:
    """K: candidates per device, at most the smallest device's vocabulary slice."""
    if wanted < 1:
        raise ValueError(f"the output head's top-k must be at least 1, got {wanted}")
    return min([wanted, *vocab_sizes])


def piece_topk(h: torch.Tensor, blk, k: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """h (R, H) final hidden states -> the best min(k, rows) logits of this head piece,
    values (R, k') float32 and global token ids (R, k') int64. Softcapping (Gemma), being
    increasing, is applied to the chosen values only: the same top k."""
    hn = rms_norm(h, blk["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    logits = linear(hn, blk["lm_head"])                          # (R, rows of the piece), hn's dtype
    values, idx = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1)
    if logits.dtype != torch.float32:
        values = rescored(hn, blk["lm_head"], idx, values)
    cap = cfg.final_logit_softcap
    if cap is not None:
        values = torch.tanh(values / cap) * cap
    return values, idx + int(blk["rows"][0])


def rescored(hn: torch.Tensor, weight, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The candidates' logits in float32: hn (R, H) against their rows of the head (R, k').
    A 16-bit logit keeps 8 (bfloat16) significant bits: 0.125 apart at 25, where a model's
    two best tokens can lie closer (SmolLM2 on "What is the capital of France?": 0.08), so
    rounded logits tie and the lower id wins. Weights that cannot give rows keep `values`.

    The rows are converted to float32 RESCORE_BYTES at a time: all of them at once would be
    R x k' x H floats (Llama-3.1-70B: 4 MiB per row of hn and head piece, 64 MiB at R = 16),
    made and freed once per piece and token, and such transients are what grew a 70B-shaped
    device's heap by 40-60 MiB past its weights (docs/benchmarks-memory.md)."""
    rows_of = weight.__getitem__ if isinstance(weight, torch.Tensor) else getattr(weight, "rows", lambda i: None)
    R, k = idx.shape
    H = hn.shape[-1]
    step = max(1, RESCORE_BYTES // (4 * H))                         # candidate rows per float32 chunk
    hf = hn.float()                                                 # (R, H)
    out = torch.empty(R, k)                                         # (R, k') float32
    for r in range(R):
        for s in range(0, k, step):
            rows = rows_of(idx[r, s:s + step])                      # (c, H or padded) of the head
            if rows is None:
                return values
            out[r, s:s + step] = torch.mv(rows.float()[:, :H], hf[r])
    return out


def merge_topk(values: list[torch.Tensor], ids: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of several (values (R, *), ids (R, *)) candidate sets: (R, k) each."""
    v, i = torch.cat(values, dim=-1), torch.cat(ids, dim=-1)
    top, where = torch.topk(v, min(k, v.shape[-1]), dim=-1)
    return top, i.gather(-1, where)


def pack(values: torch.Tensor, ids: torch.Tensor, rank: int, k: int) -> torch.Tensor:
    """This device's candidates (R, k) as one (R, 2, K) float32 tensor for the gather."""
    R, n = values.shape
    if n != k:  # the master reads exactly K candidates from every device
        raise ValueError(f"device {rank} has {n} output-head candidates, the exchange expects {k}")
    return torch.stack([values.float(), ids.to(torch.float32)], dim=1)  # (R, 2, K)


@dataclass(frozen=True)
class Candidates:
    """The merged output-head candidates of R rows: what the master samples from."""

    values: torch.Tensor   # (R, N*K) float32 logits
    ids: torch.Tensor      # (R, N*K) int64 token ids
    vocab_size: int

    @classmethod
    def unpack(cls, gathered: torch.Tensor, vocab_size: int) -> "Candidates":
        """From the gathered (N, R, 2, K) tensor: each row's candidates in device order."""
        rows = gathered.transpose(0, 1)                              # (R, N, 2, K)
        R = rows.shape[0]
        return cls(rows[:, :, 0].reshape(R, -1), rows[:, :, 1].reshape(R, -1).round().long(), vocab_size)

    def logits(self) -> torch.Tensor:
        """(R, vocab) float32: the candidates' logits, -inf everywhere else."""
        full = torch.full((self.values.shape[0], self.vocab_size), float("-inf"))
        return full.scatter_(1, self.ids, self.values)

    def argmax(self) -> torch.Tensor:
        """(R,) the greedy token of each row (ties: the lowest id, like argmax over full logits)."""
        return self.logits().argmax(-1)
