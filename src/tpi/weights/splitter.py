"""Split a checkpoint into a shard store, streaming tensor by tensor.

Peak memory is about one layer's slices in the storage dtype plus one source tensor (the
embedding, written whole, is the largest), never the whole model: source tensors are read with pread (not memory-mapped) and dropped
from the page cache, so neither the process nor its cache holds the checkpoint.

Storage dtypes: bfloat16, float16, float32, or the quantized int8 / int4 (see
tpi.weights.quant), where each device's 2-D projection slices are quantized and norms,
biases and the head stay bfloat16; or, for a GGUF source, `gguf`: every tensor as the file
holds it, quantized matrices (projections, embedding, output head) in their group forms
(tpi.weights.gguf_quant), floats in their own dtype.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tpi.dtypes import FLOAT_DTYPES
from tpi.plan import ShardPlan
from tpi.weights.checkpoint import open_source
from tpi.weights.gguf_quant import GGUFQuantized
from tpi.weights.slicing import (DEFAULT_MAX_BLOCK_BYTES, HEAD_KIND, HEAD_TENSORS, block_pieces, expert_of,
                                 fuse_projections, parse_model_tensor, slice_for_device, slice_piece)
from tpi.weights.quant import QUANT_DTYPES, quant_format, quantize_tensors
from tpi.weights.store import EMBED_PATH, FORMAT_VERSION, MANIFEST, atomic_write, block_path, write_safetensors

# storage dtype -> dtype of the float tensors (all of them, or the unquantized ones)
GGUF_DTYPE = "gguf"  # keep a GGUF file's own types
STORAGE_DTYPES = {**FLOAT_DTYPES, **{q: torch.bfloat16 for q in QUANT_DTYPES}, GGUF_DTYPE: torch.bfloat16}


def split_checkpoint(model_dir: str | Path, plan: ShardPlan, out: str | Path, dtype: str = "bfloat16",
                     max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> Path:
    """Write (or reuse, if identical) the shard store for `plan` at `out` from `model_dir`
    (a Hugging Face directory or a GGUF file). Blocks bigger than `max_block_bytes` are cut
    into pieces (see tpi.weights.slicing)."""
    model_dir, out = Path(model_dir), Path(out)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    ckpt = open_source(model_dir)  # checks a GGUF file whole before anything is written
    cfg = ckpt.config
    as_gguf = dtype == GGUF_DTYPE
    if as_gguf and not hasattr(ckpt, "stored"):
        raise ValueError(f"--dtype gguf keeps a GGUF file's own quantization; {model_dir} is not a GGUF file")
    pieces = {shard.rank: block_pieces(cfg, shard, dtype, max_block_bytes) for shard in plan.shards}
    wanted = {"format": FORMAT_VERSION, "model_config": cfg.to_json(), "plan": plan.to_json(),
              "dtype": dtype, "source": ckpt.fingerprint(), "max_block_bytes": max_block_bytes,
              "pieces": {str(r): p for r, p in pieces.items()}}
    if dtype in QUANT_DTYPES:
        wanted["quantization"] = quant_format(dtype)
    wanted = json.loads(json.dumps(wanted))  # the form it takes in the manifest (lists, not tuples)
    existing = out / MANIFEST
    if existing.is_file():
        try:
            old = json.loads(existing.read_text())
            if {k: old.get(k) for k in wanted} == wanted:
                ckpt.close()
                return out  # idempotent: this exact store is already complete
        except json.JSONDecodeError:
            pass
        existing.unlink()  # a different (or broken) store: rebuild it in place

    torch_dtype = STORAGE_DTYPES[dtype]
    quantized = dtype in QUANT_DTYPES
    files: dict[str, dict] = {}

    def emit(rel: str, tensors: dict[str, torch.Tensor]) -> None:
        sha256, size = write_safetensors(out / rel, tensors)
        files[rel] = {
            "sha256": sha256,
            "bytes": size,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in tensors.items()},
        }

    def read(name: str, rows: tuple[int, int] | None = None):
        return ckpt.stored(name, rows) if as_gguf else ckpt.get(name, rows=rows).to(torch_dtype)

    def stored(local: str, part) -> dict[str, torch.Tensor]:
        if isinstance(part, GGUFQuantized):
            return part.named(local)
        if as_gguf:
            return {local: part.clone()}
        if quantized:  # projections quantized from the source precision, the rest cast
            out_ = quantize_tensors({local: part}, dtype)
            if local in out_:
                out_[local] = part.to(torch_dtype, copy=True)
            return out_
        return {local: part.to(torch_dtype, copy=True)}

    def name_of(rank: int, layer: int, kind: str, piece: int) -> str:
        return block_path(rank, layer, kind, piece if len(pieces[rank][kind]) > 1 else None)

    by_layer: dict[int, list[tuple[str, str, str, str]]] = {}
    head_names: dict[str, str] = {}
    for name in ckpt.names():
        parsed = parse_model_tensor(name, cfg)
        if parsed is not None:
            layer, kind, local, rule = parsed
            by_layer.setdefault(layer, []).append((name, kind, local, rule))
        elif name in HEAD_TENSORS:
            head_names[HEAD_TENSORS[name]] = name
    if "embed" not in head_names or "final_norm" not in head_names:
        raise ValueError(f"{model_dir}: checkpoint lacks the embedding or the final norm")
    if len(by_layer) != cfg.num_layers:
        raise ValueError(f"{model_dir}: config says {cfg.num_layers} layers, checkpoint has {len(by_layer)}")

    # The embedding, whole, for the master's row reads; then each device's output-head rows,
    # read piece by piece (tied models: rows of the embedding).
    emit(EMBED_PATH, stored("embed", read(head_names["embed"])))
    final_norm = read(head_names["final_norm"])
    out_name = head_names["embed"] if cfg.tie_word_embeddings or "lm_head" not in head_names \
        else head_names["lm_head"]
    L = cfg.num_layers
    for shard in plan.shards:
        for p, (a, b) in enumerate(pieces[shard.rank][HEAD_KIND]):
            rows = read(out_name, rows=(a, b))                                    # (b - a, H)
            emit(name_of(shard.rank, L, HEAD_KIND, p),
                 {"final_norm": final_norm, **stored("lm_head", rows), "rows": torch.tensor([a, b])})
            del rows

    for layer in range(cfg.num_layers):
        # blocks[(rank, kind, piece)] -> {local name: tensor}, filled one source tensor at a time
        blocks: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}
        for name, kind, local, rule in by_layer[layer]:
            source = ckpt.stored(name) if as_gguf else ckpt.get(name)
            expert = expert_of(name)
            for shard in plan.shards:
                if expert is not None and not shard.holds_expert(expert):
                    continue
                part = slice_for_device(source, rule, cfg, shard)
                if part is None:
                    continue
                if expert is not None:  # one block per expert: piece p is the device's p-th expert
                    blocks.setdefault((shard.rank, kind, expert - shard.experts[0]), {}).update(stored(local, part))
                    continue
                if kind == "attn":
                    blocks.setdefault((shard.rank, kind, 0), {}).update(stored(local, part))
                    continue
                for p, (lo, hi) in enumerate(pieces[shard.rank][kind]):
                    piece = slice_piece(part, rule, lo, hi, first=p == 0)
                    if piece is not None:
                        blocks.setdefault((shard.rank, kind, p), {}).update(stored(local, piece))
            del source
        for (rank, kind, p), tensors in sorted(blocks.items()):
            emit(name_of(rank, layer, kind, p), fuse_projections(tensors))
        del blocks

    for fname, data in ckpt.model_files().items():
        atomic_write(out / "model" / fname, data)
    manifest = dict(wanted, files=files)
    sha256 = ckpt.sha256()
    if sha256:  # a GGUF source: which file(s) exactly the store was cut from
        manifest["source_sha256"] = sha256
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    ckpt.close()
    return out
