"""Read a Hugging Face safetensors checkpoint tensor by tensor (single file or sharded).

Nothing is loaded until asked for: `get(name)` memory-maps one tensor at a time, so the
splitter's peak memory is one layer, not the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


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
