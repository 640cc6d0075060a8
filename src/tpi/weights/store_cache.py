"""The bounded cache of shard stores: `<cache>/stores/<key>/`, one per (source files, plan,
dtype, format, piece cap), made by `tpi.engine.prepare_store`.

Every run with a new plan adds a store (a measured plan differs from run to run), so the
cache is bounded: after a store is prepared there, the least recently used stores are
deleted until the total fits `max_bytes()` (DEFAULT_MAX_BYTES, or `$TPI_STORE_CACHE_MAX`
such as `20G`). Never deleted: the store just prepared, and a store some process has open
(a ShardStore holds a shared lock on its manifest; eviction takes an exclusive one without
waiting and skips a store it cannot lock). A store is deleted manifest first, so a
half-deleted one never passes for complete. A directory without a manifest untouched for
INCOMPLETE_AGE_S is an abandoned split and goes too. `tpi cache list` shows the cache and
`tpi cache prune` prunes it by hand.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tpi.weights.store import MANIFEST

DEFAULT_MAX_BYTES = 16 << 30
LAST_USED = ".last-used"          # its mtime: when a run last prepared (or reused) the store
INCOMPLETE_AGE_S = 3600.0
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class CachedStore:
    path: Path
    bytes: int
    last_used: float              # seconds since the epoch
    in_use: bool                  # a process has it open
    complete: bool                # it has a manifest
    summary: str                  # devices, dtype, source model directory

    def to_json(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "last_used": self.last_used, "in_use": self.in_use,
                "complete": self.complete, "summary": self.summary}


def parse_size(text: str) -> int:
    """'16G', '500M', '1024' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in UNITS and t[-1:] else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * UNITS[unit])
    except ValueError:
        raise ValueError(f"cannot read the size {text!r}: use e.g. 16G, 500M or a number of bytes") from None


def max_bytes() -> int:
    env = os.environ.get("TPI_STORE_CACHE_MAX")
    return parse_size(env) if env else DEFAULT_MAX_BYTES


def mark_used(store: Path) -> None:
    (Path(store) / LAST_USED).touch()


def list_stores(root: Path) -> list[CachedStore]:
    """The stores under `root`, most recently used first."""
    root = Path(root)
    out = [_describe(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    return sorted(out, key=lambda s: s.last_used, reverse=True)


def evict(root: Path, limit: int, keep: Path | None = None) -> list[CachedStore]:
    """Delete least recently used stores under `root` until the rest fit `limit` bytes;
    returns those deleted (see the module docstring for what is never deleted)."""
    stores = list_stores(root)
    total = sum(s.bytes for s in stores)
    now, deleted = time.time(), []
    for s in reversed(stores):  # least recently used first
        abandoned = not s.complete and now - s.last_used > INCOMPLETE_AGE_S
        if total <= limit and not abandoned:
            continue
        if (keep is not None and s.path.resolve() == Path(keep).resolve()) or s.in_use:
            continue
        if not s.complete and not abandoned:
            continue  # a split in progress
        if _delete(s.path):
            total -= s.bytes
            deleted.append(s)
    return deleted


def _describe(path: Path) -> CachedStore:
    size, newest = 0, path.stat().st_mtime
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            size += st.st_size
            newest = max(newest, st.st_mtime)
    marker = path / LAST_USED
    last_used = marker.stat().st_mtime if marker.exists() else newest
    summary, complete = "incomplete (no manifest)", (path / MANIFEST).is_file()
    if complete:
        try:
            m = json.loads((path / MANIFEST).read_bytes())
            cfg = m["model_config"]
            summary = (f"{cfg['architecture']} {cfg['num_layers']} layers, {len(m['plan']['shards'])} device(s), "
                       f"{m['dtype']}")
        except (OSError, ValueError, KeyError, TypeError):
            summary = "unreadable manifest"
    return CachedStore(path, size, last_used, complete and _locked(path), complete, summary)


def _locked(path: Path) -> bool:
    """Whether a process holds the store open (its shared lock on the manifest)."""
    try:
        fd = os.open(path / MANIFEST, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _delete(path: Path) -> bool:
    manifest = path / MANIFEST
    if manifest.exists():
        fd = os.open(manifest, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # opened since we looked
        try:
            manifest.unlink()  # first: from here on it is an incomplete store
        finally:
            os.close(fd)
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()
