"""Split a checkpoint into a shard store, streaming tensor by tensor.

Peak memory is about one layer's slices in the storage dtype plus one source tensor,
never the whole model: source tensors are read with pread (not memory-mapped) and dropped
from the page cache, so neither the process nor its cache holds the checkpoint.

Storage dtypes: bfloat16, float16, float32, or the quantized int8 / int4 (see
tpi.weights.quant), where each device's 2-D projection slices are quantized and norms,
biases and the head stay bfloat16.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tpi.config import load_model_config
from tpi.plan import ShardPlan
from tpi.weights.checkpoint import Checkpoint
from tpi.weights.slicing import HEAD_TENSORS, parse_layer_name, slice_for_device
from tpi.weights.quant import QUANT_DTYPES, quant_format, quantize_tensors
from tpi.weights.store import (FORMAT_VERSION, HEAD_PATH, MANIFEST, atomic_write, block_path, read_header,
                               read_tensor, write_safetensors)

FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# storage dtype -> dtype of the float tensors (all of them, or the unquantized ones)
STORAGE_DTYPES = {**FLOAT_DTYPES, **{q: torch.bfloat16 for q in QUANT_DTYPES}}
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")


def split_checkpoint(model_dir: str | Path, plan: ShardPlan, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Write (or reuse, if identical) the shard store for `plan` at `out`."""
    model_dir, out = Path(model_dir), Path(out)
    cfg = load_model_config(model_dir)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    wanted = {"format": FORMAT_VERSION, "model_config": cfg.to_json(), "plan": plan.to_json(),
              "dtype": dtype, "source": _fingerprint(model_dir)}
    if dtype in QUANT_DTYPES:
        wanted["quantization"] = quant_format(dtype)
    wanted = json.loads(json.dumps(wanted))  # the form it takes in the manifest (lists, not tuples)
    existing = out / MANIFEST
    if existing.is_file():
        try:
            old = json.loads(existing.read_text())
            if {k: old.get(k) for k in wanted} == wanted:
                return out  # idempotent: this exact store is already complete
        except json.JSONDecodeError:
            pass
        existing.unlink()  # a different (or broken) store: rebuild it in place

    torch_dtype = STORAGE_DTYPES[dtype]
    quantized = dtype in QUANT_DTYPES
    ckpt = _SourceReader(Checkpoint(model_dir))
    files: dict[str, dict] = {}

    def emit(rel: str, tensors: dict[str, torch.Tensor]) -> None:
        sha256, size = write_safetensors(out / rel, tensors)
        files[rel] = {
            "sha256": sha256,
            "bytes": size,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in tensors.items()},
        }

    by_layer: dict[int, list[tuple[str, str, str, str]]] = {}
    head: dict[str, torch.Tensor] = {}
    for name in ckpt.names():
        parsed = parse_layer_name(name)
        if parsed is not None:
            layer, kind, local, rule = parsed
            by_layer.setdefault(layer, []).append((name, kind, local, rule))
        elif name in HEAD_TENSORS:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            head[HEAD_TENSORS[name]] = ckpt.get(name).to(torch_dtype)
    if "embed" not in head or "final_norm" not in head:
        raise ValueError(f"{model_dir}: checkpoint lacks the embedding or the final norm")
    if len(by_layer) != cfg.num_layers:
        raise ValueError(f"{model_dir}: config says {cfg.num_layers} layers, checkpoint has {len(by_layer)}")
    emit(HEAD_PATH, head)
    del head

    for layer in range(cfg.num_layers):
        # blocks[(rank, kind)] -> {local name: tensor}, filled one source tensor at a time
        blocks: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for name, kind, local, rule in by_layer[layer]:
            source = ckpt.get(name)
            for shard in plan.shards:
                part = slice_for_device(source, rule, cfg, shard)
                if part is None:
                    continue
                if quantized:  # projections quantized from the source precision, the rest cast
                    stored = quantize_tensors({local: part}, dtype)
                    if local in stored:
                        stored[local] = part.to(torch_dtype, copy=True)
                else:
                    stored = {local: part.to(torch_dtype, copy=True)}
                blocks.setdefault((shard.rank, kind), {}).update(stored)
            del source
        for (rank, kind), tensors in sorted(blocks.items()):
            emit(block_path(rank, layer, kind), tensors)
        del blocks

    model_out = out / "model"
    model_out.mkdir(parents=True, exist_ok=True)
    for fname in MODEL_FILES:
        if (model_dir / fname).is_file():
            shutil.copyfile(model_dir / fname, model_out / fname)
    manifest = dict(wanted, files=files)
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    ckpt.close()
    return out


class _SourceReader:
    """Checkpoint tensors by name, read with pread into their own memory (no mmap)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.headers: dict[Path, tuple[dict, int]] = {}

    def names(self) -> list[str]:
        return self.ckpt.names()

    def get(self, name: str) -> torch.Tensor:
        path = self.ckpt.file_of[name]
        if path not in self.headers:
            self.headers[path] = read_header(path)
        header, base = self.headers[path]
        return read_tensor(path, header, base, name)

    def close(self) -> None:
        self.ckpt.close()


def _fingerprint(model_dir: Path) -> dict:
    """Cheap identity of the source checkpoint: names, sizes and mtimes of its files."""
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)]
            for p in sorted(model_dir.glob("*.safetensors"))}
