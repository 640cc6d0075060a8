"""Read a Hugging Face safetensors checkpoint tensor by tensor (single file or sharded).

Nothing is loaded until asked for: `get(name)` memory-maps one tensor at a time, so the
splitter's peak memory is one layer, not the model.

`open_source` gives the splitter either kind of source behind one interface: a Hugging Face
directory (`SafetensorsSource`) or a GGUF file (tpi.weights.gguf_source.GGUFCheckpoint):
`config`, `names()`, `get(name, rows)`, `model_files()`, `fingerprint()`, `close()`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from tpi.config import ModelConfig, load_model_config


class CheckpointError(ValueError):
    """The checkpoint directory is missing files or holds unreadable ones."""


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.file_of: dict[str, Path] = {}   # tensor name -> file holding it
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, fname in weight_map.items():
                self.file_of[name] = self.dir / fname
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {self.dir}")
            for f in files:
                for name in self._open(f).keys():
                    self.file_of[name] = f
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path}: {e}") from e

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._open(path)
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


# Files of a Hugging Face directory the store keeps in model/ (the master reads them).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")


class SafetensorsSource:
    """A Hugging Face directory's tensors by name, read with pread into their own memory (no
    mmap, so nothing of the checkpoint stays mapped or cached)."""

    def __init__(self, model_dir: str | Path):
        from tpi.weights.store import read_header

        self.dir = Path(model_dir)
        self.config: ModelConfig = load_model_config(self.dir)
        self.ckpt = Checkpoint(self.dir)
        self._read_header = read_header
        self.headers: dict[Path, tuple[dict, int]] = {}

    def names(self) -> list[str]:
        return self.ckpt.names()

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its rows [a, b) (reading only their bytes)."""
        from tpi.weights.store import read_tensor

        path = self.ckpt.file_of[name]
        if path not in self.headers:
            self.headers[path] = self._read_header(path)
        header, base = self.headers[path]
        return read_tensor(path, header, base, name, rows=rows)

    def model_files(self) -> dict[str, bytes]:
        return {f: (self.dir / f).read_bytes() for f in MODEL_FILES if (self.dir / f).is_file()}

    def fingerprint(self) -> dict:
        return source_fingerprint(self.dir)

    def sha256(self) -> dict | None:
        return None  # not hashed: the fingerprint identifies a directory's files

    def close(self) -> None:
        self.ckpt.close()


def open_source(path: str | Path):
    """The splitter's reader for a model source: a GGUF file or a Hugging Face directory."""
    from tpi.weights.gguf_source import GGUFCheckpoint, is_gguf

    return GGUFCheckpoint(path) if is_gguf(path) else SafetensorsSource(path)


def source_fingerprint(path: str | Path) -> dict:
    """Identity of every source file a store is made from or copies: the weights by name,
    size and mtime (cheap: they are gigabytes), the small files of MODEL_FILES (config,
    tokenizer, chat template, ...) by sha256, so an edited tokenizer makes another store. A
    GGUF file (or the parts of a split one) holds all of these: its files by size and mtime."""
    from tpi.weights.gguf_file import split_files
    from tpi.weights.gguf_source import is_gguf

    path = Path(path)
    if is_gguf(path):
        return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in split_files(path)}
    out: dict = {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(path.glob("*.safetensors"))}
    for name in MODEL_FILES:
        if (path / name).is_file():
            out[name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    return out


def source_config(path: str | Path) -> ModelConfig:
    """The model config of a source (GGUF: from its metadata, checked against its tensors)."""
    from tpi.weights.gguf_source import is_gguf, load_gguf_config

    return load_gguf_config(path) if is_gguf(path) else load_model_config(path)
