"""The shard store: per-device, per-layer block files plus a manifest.

Layout of a store directory:
  manifest.json                 model config, plan, dtype, and per file: sha256, bytes, tensors
  model/                        config.json, tokenizer files (the master reads these)
  head.safetensors              embed (vocab, H), final_norm (H,), [lm_head (vocab, H)]
  rank-R/layer-LLL.attn.safetensors, rank-R/layer-LLL.mlp.safetensors

The manifest is written last, atomically: a store without one is incomplete.
Every block read is checked against its sha256; a mismatch names the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from tpi.config import ModelConfig
from tpi.plan import ShardPlan

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StoreError(ValueError):
    """The shard store is missing, incomplete or corrupt."""


def block_path(rank: int, layer: int, kind: str) -> str:
    return f"rank-{rank}/layer-{layer:03d}.{kind}.safetensors"


HEAD_PATH = "head.safetensors"


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int
    tensors: dict  # name -> {"shape": [...], "dtype": "..."}


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{self.root} is not a complete shard store (no {MANIFEST})")
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{mpath} is not valid JSON: {e}") from e
        if m.get("format") != FORMAT_VERSION:
            raise StoreError(f"{mpath}: unknown store format {m.get('format')!r}")
        self.manifest = m
        self.config = ModelConfig.from_json(m["model_config"])
        self.plan = ShardPlan.from_json(m["plan"])
        self.dtype = m["dtype"]
        self.files = {k: FileEntry(**v) for k, v in m["files"].items()}

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def file_bytes(self, rel: str) -> int:
        return self.files[rel].bytes

    def read_verified(self, rel: str) -> bytes:
        """The file's bytes, refused unless they match the manifest's size and sha256."""
        entry = self.files.get(rel)
        if entry is None:
            raise StoreError(f"{rel} is not listed in {self.root / MANIFEST}")
        path = self.root / rel
        try:
            data = read_uncached(path)
        except FileNotFoundError:
            raise StoreError(f"block file missing: {path}") from None
        if len(data) != entry.bytes:
            raise StoreError(f"block file {path} has {len(data)} bytes, manifest says {entry.bytes} (truncated?)")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(f"block file {path} failed its sha256 check (altered or corrupt)")
        return data

    def load(self, rel: str) -> dict[str, torch.Tensor]:
        try:
            return load_safetensors(self.read_verified(rel))
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"block file {self.root / rel} cannot be parsed: {e}") from e

    def load_block(self, rank: int, layer: int, kind: str) -> dict[str, torch.Tensor]:
        return self.load(block_path(rank, layer, kind))

    def load_head(self) -> dict[str, torch.Tensor]:
        return self.load(HEAD_PATH)

    def block_files(self, rank: int) -> list[str]:
        return [block_path(rank, layer, kind)
                for layer in range(self.config.num_layers) for kind in ("attn", "mlp")]


def read_uncached(path: Path) -> bytes:
    """Read a whole file, then tell the kernel to drop its pages: streamed weights must
    not pile up in the page cache inside a device's memory limit."""
    with open(path, "rb") as f:
        data = f.read()
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
    return data
