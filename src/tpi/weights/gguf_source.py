"""A GGUF model as a checkpoint: Hugging Face names, config and tokenizer from its metadata.

The splitter reads a GGUF model through the same three calls as a safetensors checkpoint
(`names`, `get(name, rows)`, `close`), plus `raw(name)` for storing quantized tensors as they
are (tpi.weights.gguf_quant). Everything about the file is checked when it is opened, before a
store is written: its architecture, every tensor's type, and that the metadata agrees with
the tensors' shapes.

Q/K permutation. llama.cpp's converter reorders the rows of q_proj and k_proj of
llama-architecture models, inside each head, from Hugging Face's rotate-half layout
(first half of the head's dims, then the second) to interleaved pairs (GGML's RoPE rotates
adjacent pairs): GGUF row 2i + j of a head is HF row j * hd/2 + i. `get` and `raw` undo it
(as transformers' GGUF loader does), so everything downstream sees Hugging Face's layout.
It is a permutation of whole rows, and a row of a quantized tensor is a run of whole blocks,
so it is exact on quantized tensors too. Qwen2-, Qwen3(-MoE)- and Gemma 3-architecture files
are not permuted.

Families (tpi.weights.gguf_families): a mixture-of-experts file stacks each layer's experts in
one 3-D tensor per kind (`ffn_gate_exps`: experts, rows, width); it is read as one Hugging Face
tensor per expert (`...experts.E.w1.weight`), each a row range of the stacked tensor, so the
splitter reads only the experts a device holds. Gemma 3's norm weights come back without the
1 llama.cpp's converter added to them.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tpi.config import ModelConfig, UnsupportedModelError, parse_hf_config
from tpi.weights.gguf_families import EXPERT_KINDS, FAMILIES, LAYER_NAMES, Meta, family_of
from tpi.weights.gguf_file import SUPPORTED_TYPES, GGUFError, GGUFFile, dequantize
from tpi.weights.gguf_tokenizer import stop_token_ids

HEAD_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
EXPERTS_RE = re.compile(r"^ffn_(gate|up|down)_exps\.weight$")
LEGACY_EXPERT_RE = re.compile(r"^ffn_(gate|up|down)\.(\d+)\.weight$")  # one tensor per expert (older Mixtral files)
HF_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")
ROUTER = "ffn_gate_inp.weight"
FLOAT_OF = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
IGNORED = {"rope_freqs.weight"}  # llama3 RoPE factors: checked against the config (see _rope_scaling)


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".gguf" and p.is_file()


class GGUFCheckpoint:
    """A checked GGUF model, readable tensor by tensor under Hugging Face names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        meta = self.file.metadata
        self.arch = meta.get("general.architecture")
        self.family = family_of(self.arch, meta)
        if self.family is None:
            raise UnsupportedModelError(f"{self.path.name}: GGUF architecture {self.arch!r} is not supported; "
                                        f"TPI reads {', '.join(sorted(FAMILIES))}")
        self.hf_architecture, self.permuted = self.family.hf_architecture, self.family.permuted
        self.meta = Meta(meta, self.arch, self.path.name, GGUFError)
        self.gguf_of: dict[str, str] = {}     # HF name -> GGUF name
        self.expert_of: dict[str, int] = {}   # HF name of an expert's tensor -> its index in the stack
        for name, info in self.file.tensors.items():
            if name in IGNORED:
                continue
            hf = self._hf_names(name, info.shape)
            if not hf:
                raise UnsupportedModelError(f"{self.path.name}: tensor {name} is not part of a {self.arch} model TPI runs")
            if info.type_name not in SUPPORTED_TYPES:
                raise GGUFError(f"{self.path.name}: tensor {name} has GGML type {info.type_name}, which TPI does "
                                f"not read (supported: {', '.join(SUPPORTED_TYPES)})")
            for e, h in enumerate(hf):
                self.gguf_of[h] = name
                if EXPERTS_RE.match(name.split(".", 2)[-1]):
                    self.expert_of[h] = e
        self.hf_config = self._hf_config()
        self.config = parse_hf_config(self.hf_config)
        self._check_shapes()

    def _hf_names(self, name: str, shape: tuple[int, ...]) -> list[str]:
        """The Hugging Face name(s) of a GGUF tensor: one per expert of a stacked expert tensor."""
        if name in HEAD_NAMES:
            return [HEAD_NAMES[name]]
        m = BLOCK_RE.match(name)
        if not m:
            return []
        prefix, suffix, fam = f"model.layers.{m.group(1)}.", m.group(2), self.family
        if suffix == ROUTER and fam.router:
            return [prefix + fam.router]
        stacked = EXPERTS_RE.match(suffix)
        if stacked and fam.experts:
            if len(shape) != 3:
                raise GGUFError(f"{self.path.name}: {name} has shape {tuple(shape)}, not (experts, rows, width)")
            return [prefix + fam.experts[stacked.group(1)].format(e=e) for e in range(shape[0])]
        legacy = LEGACY_EXPERT_RE.match(suffix)
        if legacy and fam.experts:
            return [prefix + fam.experts[legacy.group(1)].format(e=int(legacy.group(2)))]
        names = fam.layer_names()
        return [prefix + names[suffix]] if suffix in names else []

    # --- the checkpoint interface (tpi.weights.splitter) ---------------------------------

    def names(self) -> list[str]:
        return list(self.gguf_of)

    def type_of(self, name: str) -> str:
        return self.file.tensors[self.gguf_of[name]].type_name

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor's raw GGUF bytes, uint8 (rows, row_bytes), rows in Hugging Face order."""
        expert = self.expert_of.get(name)
        if expert is None:
            raw = self.file.read(self.gguf_of[name], rows)
        else:  # rows [a, b) of expert e: rows e * per + [a, b) of the stack
            per = self.file.tensors[self.gguf_of[name]].shape[1]
            a, b = rows if rows is not None else (0, per)
            raw = self.file.read(self.gguf_of[name], (expert * per + a, expert * per + b))
        perm = self._row_permutation(name)
        if perm is not None:
            if rows is not None:
                raise ValueError(f"{name}: row ranges of a permuted tensor are not read")
            raw = raw[perm]
        return raw

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor dequantized to float32 (its rows [a, b) only, if given)."""
        info = self.file.tensors[self.gguf_of[name]]
        out = dequantize(self.raw(name, rows), info.type_name, info.shape[-1])
        if self.family.norm_shift and name.endswith("norm.weight"):  # Gemma: undo the converter's + 1
            out = out - np.float32(self.family.norm_shift)
        return torch.from_numpy(out)  # its own buffer

    def stored(self, name: str, rows: tuple[int, int] | None = None):
        """The tensor as a `--dtype gguf` store keeps it: a quantized matrix as its group form
        (tpi.weights.gguf_quant.GGUFQuantized), anything else in its own float dtype."""
        from tpi.weights.gguf_quant import GROUP_TYPES, from_gguf

        info = self.file.tensors[self.gguf_of[name]]
        if info.type_name in GROUP_TYPES and len(info.shape) >= 2:  # a matrix, or one expert's
            return from_gguf(self.raw(name, rows), info.type_name, info.shape[-1])
        return self.get(name, rows).to(FLOAT_OF.get(info.type_name, torch.float32))

    def close(self) -> None:
        pass

    def matrix_types(self) -> tuple[tuple[str, str, int], ...]:
        """(part, GGUF type, parameters) of the 2-D matrices, part "layers" or "head" (the
        output head: lm_head, or the embedding when tied): what the planner's cost model
        charges a gguf store for (tpi.cluster.estimate.PlannerSettings.gguf_types)."""
        tied = "lm_head.weight" not in self.gguf_of
        counts: dict[tuple[str, str], int] = {}
        for hf, name in self.gguf_of.items():
            info = self.file.tensors[name]
            if len(info.shape) != 2 or (hf == "model.embed_tokens.weight" and not tied):
                continue
            part = "layers" if hf.startswith("model.layers.") else "head"
            key = (part, info.type_name)
            counts[key] = counts.get(key, 0) + int(np.prod(info.shape))
        return tuple((part, t, n) for (part, t), n in sorted(counts.items()))

    # --- what the store keeps besides tensors --------------------------------------------

    def model_files(self) -> dict[str, bytes]:
        """config.json, generation_config.json and the tokenizer files, for the store's model/
        directory. A GGUF file holds no generation settings: the generation config is the one
        transformers derives from a model config (special token ids, no do_sample: greedy)."""
        from tpi.weights.gguf_tokenizer import tokenizer_files

        meta = self.file.metadata
        generation = {k: v for k, v in (("bos_token_id", meta.get("tokenizer.ggml.bos_token_id")),
                                        ("eos_token_id", self.hf_config["eos_token_id"]),
                                        ("pad_token_id", meta.get("tokenizer.ggml.padding_token_id")))
                      if v is not None}
        files = {"config.json": json.dumps(self.hf_config, indent=1).encode(),
                 "generation_config.json": json.dumps(generation, indent=1).encode()}
        files.update(tokenizer_files(self.file.metadata, self.path.name))
        return files

    def fingerprint(self) -> dict:
        """Cheap identity for reusing a store: names, sizes and mtimes of the file(s)."""
        from tpi.weights.checkpoint import source_fingerprint

        return source_fingerprint(self.path)

    def sha256(self) -> dict:
        """sha256 of each file, for the store's manifest (read in chunks, not cached)."""
        from tpi.weights.store import hash_file

        return {p.name: hash_file(p)[0] for p in self.file.files}

    # --- metadata ------------------------------------------------------------------------

    def _hf_config(self) -> dict:
        meta = self.file.metadata
        hidden, heads = int(self.meta.required("embedding_length")), int(self.meta.required("attention.head_count"))
        kv = self.meta.get("attention.head_count_kv", heads)
        if isinstance(kv, list) or isinstance(self.meta.get("feed_forward_length"), list):
            raise UnsupportedModelError(f"{self.path.name}: per-layer head counts or widths are not supported")
        embed = self.file.tensors["token_embd.weight"] if "token_embd.weight" in self.file.tensors else None
        vocab = self.meta.get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())) or (embed and embed.shape[0])
        stops = stop_token_ids(meta)
        head_dim = self.meta.get("attention.key_length") or self.meta.get("rope.dimension_count") or hidden // heads
        hf = {
            "architectures": [self.hf_architecture],
            "model_type": self.family.model_type,
            "hidden_size": hidden,
            "intermediate_size": int(self.meta.required("feed_forward_length")),
            "num_hidden_layers": int(self.meta.required("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv),
            "head_dim": int(head_dim),
            "vocab_size": int(vocab),
            "rms_norm_eps": float(self.meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self.meta.get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.meta.get("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self.file.tensors,
            "hidden_act": "silu",
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            # the stop set (gguf_tokenizer.stop_token_ids), a list when more than eos, as
            # Hugging Face's own configs list Gemma's [1, 106] and Llama 3's end tokens
            "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
        }
        if self.family.config:
            hf.update(self.family.config(self.meta, hf["num_hidden_layers"]))
        if self.meta.get("rope.scaling.type") not in (None, "none") and "rope_parameters" not in hf:
            raise UnsupportedModelError(f"{self.path.name}: RoPE scaling {self.meta.get('rope.scaling.type')!r} "
                                        "is not supported")
        if "rope_freqs.weight" in self.file.tensors:
            hf["rope_scaling"] = self._rope_scaling(hf)
        return hf

    def _rope_scaling(self, hf: dict) -> dict:
        """llama3 RoPE (Llama 3.1 / 3.2): GGUF stores the per-frequency divisors as a tensor,
        not the four parameters. Meta's values (low 1, high 4, original 8192; factor = the
        largest divisor) are taken when they reproduce the tensor, else the file is refused."""
        from tpi.config import RopeScaling
        from tpi.model.layers import rope_inv_freq

        freqs = torch.from_numpy(dequantize(self.file.read("rope_freqs.weight"), "F32", -1).copy()).reshape(-1)
        rs = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        plain = parse_hf_config(hf)
        base = rope_inv_freq(plain)
        scaled = rope_inv_freq(replace(plain, rope_scaling=RopeScaling(
            **{k: v for k, v in rs.items() if k != "rope_type"})))
        if base.shape != freqs.shape or not torch.allclose(base / scaled, freqs, rtol=1e-3):
            raise UnsupportedModelError(f"{self.path.name}: rope_freqs.weight is not llama3 RoPE scaling "
                                        "with Meta's parameters; TPI cannot reproduce it")
        return rs

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF layer suffix (experts as '*') -> the shape the metadata implies."""
        c, hf = self.config, self.hf_config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        H, inter = c.hidden_size, int(hf["intermediate_size"])
        want = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
                "pre_feedforward_layernorm.weight": (H,), "post_feedforward_layernorm.weight": (H,),
                "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H),
                "self_attn.v_proj.weight": (kv, H), "self_attn.o_proj.weight": (H, q),
                "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
                "self_attn.o_proj.bias": (H,), "self_attn.q_norm.weight": (c.head_dim,),
                "self_attn.k_norm.weight": (c.head_dim,), "mlp.gate_proj.weight": (inter, H),
                "mlp.up_proj.weight": (inter, H), "mlp.down_proj.weight": (H, inter)}
        fam = self.family
        if fam.router:
            w = int(hf.get("moe_intermediate_size") or inter)
            want[fam.router] = (c.num_experts, H)
            per = {"gate": (w, H), "up": (w, H), "down": (H, w)}
            want.update({fam.experts[k].format(e="*"): (c.num_experts, *per[k]) for k in EXPERT_KINDS})
        return want

    def _check_shapes(self) -> None:
        """Every tensor's shape as the metadata implies it: a file whose metadata disagrees
        with its tensors is refused, naming both."""
        c = self.config
        want = self._expected_shapes()
        head = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,),
                "lm_head.weight": (c.vocab_size, c.hidden_size)}
        layers = set()
        for hf, name in self.gguf_of.items():
            shape = tuple(self.file.tensors[name].shape)
            if hf in head:
                expected = head[hf]
            else:
                layer, suffix = hf.split(".", 3)[2], hf.split(".", 3)[3]
                layers.add(int(layer))
                expert = HF_EXPERT_RE.match(suffix)
                if expert:
                    suffix = f"{expert.group(1)}.*.{expert.group(3)}"
                expected = want[suffix]
                if expert and hf not in self.expert_of:  # an older file's single expert
                    expected = expected[1:]
                    if int(expert.group(2)) >= c.num_experts:
                        raise GGUFError(f"{self.path.name}: the metadata disagrees with the tensors: {name} is "
                                        f"expert {expert.group(2)}, {self.arch}.expert_count is {c.num_experts}")
            if shape == expected:
                continue
            if (hf in self.expert_of or name.endswith(ROUTER)) and shape[1:] == expected[1:]:
                raise GGUFError(f"{self.path.name}: the metadata disagrees with the tensors: {name} has "
                                f"{shape[0]} experts, {self.arch}.expert_count is {c.num_experts}")
            raise GGUFError(f"{self.path.name}: the metadata disagrees with the tensors: {name} has shape "
                            f"{shape}, the metadata ({self.arch}.*) implies {expected}")
        fam = self.family
        for i in range(c.num_layers if fam.router else 0):  # every block a mixture: its router and experts
            prefix = f"model.layers.{i}."
            parts = {ROUTER: [prefix + fam.router]}
            parts.update({f"ffn_{k}_exps.weight": [prefix + fam.experts[k].format(e=e) for e in range(c.num_experts)]
                          for k in EXPERT_KINDS})
            for part, hf_names in parts.items():
                if any(h not in self.gguf_of for h in hf_names):
                    raise GGUFError(f"{self.path.name}: block {i} has no {part} (or not every expert's) "
                                    f"({fam.model_type} has experts in every block)")
        if layers != set(range(c.num_layers)):
            raise GGUFError(f"{self.path.name}: the metadata disagrees with the tensors: "
                            f"{self.arch}.block_count is {c.num_layers}, the file has blocks "
                            f"{sorted(layers)[:3]}...{sorted(layers)[-3:]} ({len(layers)})")
        for needed in ("model.embed_tokens.weight", "model.norm.weight"):
            if needed not in self.gguf_of:
                raise GGUFError(f"{self.path.name}: no {needed} ({'token_embd' if 'embed' in needed else 'output_norm'})")

    def _row_permutation(self, name: str) -> np.ndarray | None:
        """GGUF row of each Hugging Face row of q/k (see the module docstring); None if unpermuted."""
        if not self.permuted or not name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            return None
        c = self.config
        heads = c.num_heads if ".q_proj." in name else c.num_kv_heads
        rows = heads * c.head_dim
        return np.arange(rows).reshape(heads, c.head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


def load_gguf_config(path: str | Path) -> ModelConfig:
    return GGUFCheckpoint(path).config
