"""Split a checkpoint into a shard store, streaming tensor by tensor.

Peak memory is about one layer's slices in the storage dtype plus one source tensor,
never the whole model.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from tpi.config import load_model_config
from tpi.plan import ShardPlan
from tpi.weights.checkpoint import Checkpoint
from tpi.weights.slicing import HEAD_TENSORS, parse_layer_name, slice_for_device
from tpi.weights.store import FORMAT_VERSION, HEAD_PATH, MANIFEST, atomic_write, block_path

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
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
    ckpt = Checkpoint(model_dir)
    files: dict[str, dict] = {}

    def emit(rel: str, tensors: dict[str, torch.Tensor]) -> None:
        data = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
        atomic_write(out / rel, data)
        files[rel] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
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
                if part is not None:
                    blocks.setdefault((shard.rank, kind), {})[local] = part.to(torch_dtype, copy=True)
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


def _fingerprint(model_dir: Path) -> dict:
    """Cheap identity of the source checkpoint: names, sizes and mtimes of its files."""
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)]
            for p in sorted(model_dir.glob("*.safetensors"))}
