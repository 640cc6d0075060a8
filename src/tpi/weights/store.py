"""The shard store: per-device, per-layer block files plus a manifest.

Layout of a store directory (format 2):
  manifest.json                 model config, plan, dtype, max_block_bytes, pieces per rank,
                                and per file: sha256, bytes, tensors
  model/                        config.json, tokenizer files (the master reads these)
  embed.safetensors             embed (vocab, H): the master reads the rows it embeds, on demand
  rank-R/layer-LLL.attn.safetensors, rank-R/layer-LLL.mlp.safetensors
                                (a mixture of experts: also layer-LLL.expert.pE per expert held,
                                and a dense layer's layer-LLL.dense; tpi.weights.slicing)
  rank-R/head.safetensors       final_norm (H,), lm_head (rows, H), rows (2,): the device's
                                vocabulary slice of the output head
A block cut into pieces (see tpi.weights.slicing) has one file per piece, `.pN` before the
extension: rank-R/layer-LLL.mlp.p0.safetensors, ..., rank-R/head.p0.safetensors, ...

The manifest is written last, atomically: a store without one is incomplete.
Every block read is checked against its sha256; a mismatch names the file. (The
sliding-window scheduler, which re-reads blocks every token, checks the sha256 on the first
read of each file and again whenever the file's stat changes: see tpi.weights.scheduler.)

Block files are safetensors. Besides the whole-file `load`, this module reads them without
copies: `read_into` fills a caller's uint8 buffer (with O_DIRECT where it can, else chunk by
chunk, dropping each chunk from the page cache), and `tensors_from_buffer` makes the tensors
as views of that buffer.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import weakref
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from tpi.config import ModelConfig
from tpi.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES
from tpi.host import drop_file_cache
from tpi.plan import ShardPlan
from tpi.weights.slicing import layer_kinds

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 2: embedding file, vocabulary-split output head, block pieces; 3: fused qkv, gate_up


class StoreError(ValueError):
    """The shard store is missing, incomplete or corrupt."""


def block_path(rank: int, layer: int, kind: str, piece: int | None = None) -> str:
    """The file of a block (piece None: a block stored whole) or of one of its pieces.
    The output head (kind "head") is named without its pseudo-layer number."""
    stem = f"rank-{rank}/head" if kind == "head" else f"rank-{rank}/layer-{layer:03d}.{kind}"
    return f"{stem}.safetensors" if piece is None else f"{stem}.p{piece}.safetensors"


EMBED_PATH = "embed.safetensors"


def execution_order(cfg: ModelConfig, pieces: dict) -> list[tuple[int, str, int]]:
    """(layer, kind, piece) in the order a device uses them each token: every layer's
    attention then MLP pieces (a mixture of experts: the router, then its experts, of which
    a token uses only some; its dense layers: their "dense" pieces), then the output head's
    (layer = num_layers). `pieces`: kind -> ranges, as in the manifest."""
    L = cfg.num_layers
    order = [(layer, kind, p) for layer in range(L) for kind in layer_kinds(cfg, layer)
             for p in range(len(pieces.get(kind, ())))]
    return order + [(L, "head", p) for p in range(len(pieces["head"]))]


def piece_file(rank: int, layer: int, kind: str, piece: int, pieces: dict) -> str:
    """The file of a piece: named as a whole block when its kind has only one piece."""
    return block_path(rank, layer, kind, piece if len(pieces[kind]) > 1 else None)


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
        drop_file_cache(f.fileno())  # written shards must not fill the page cache either
    os.replace(tmp, path)


class _Held:
    """A shared lock on a file, released (descriptor closed) when this object goes."""
    __slots__ = ("__weakref__",)


def _hold(path: Path) -> _Held | None:
    """Hold a shared lock on `path` for the life of the returned object (tpi.weights.store_cache)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    held = _Held()
    weakref.finalize(held, os.close, fd)
    return held


class ShardStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{self.root} is not a complete shard store (no {MANIFEST})")
        self._in_use = _hold(mpath)  # the store cache never deletes a store a process has open
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

    def load_views(self, rel: str) -> dict[str, torch.Tensor]:
        """Like `load`, verified the same way, but the tensors are views of one buffer the
        file is read into (no bytes object, no second copy: peak = the file's size)."""
        entry = self.files.get(rel)
        if entry is None:
            raise StoreError(f"{rel} is not listed in {self.root / MANIFEST}")
        path = self.root / rel
        buf = aligned_empty(entry.bytes)
        try:
            size, _ = read_into(path, buf)
        except FileNotFoundError:
            raise StoreError(f"block file missing: {path}") from None
        if size != entry.bytes:
            raise StoreError(f"block file {path} has {size} bytes, manifest says {entry.bytes} (truncated?)")
        if hashlib.sha256(memoryview(buf[:size].numpy())).hexdigest() != entry.sha256:
            raise StoreError(f"block file {path} failed its sha256 check (altered or corrupt)")
        return tensors_from_buffer(buf, size, str(path))

    def load_block(self, rank: int, layer: int, kind: str, piece: int = 0) -> dict[str, torch.Tensor]:
        return self.load(self.piece_path(rank, layer, kind, piece))

    def pieces(self, rank: int) -> dict[str, list[tuple[int, int]]]:
        """kind -> ranges of its pieces (see tpi.weights.slicing.block_pieces)."""
        return {k: [tuple(r) for r in v] for k, v in self.manifest["pieces"][str(rank)].items()}

    def piece_path(self, rank: int, layer: int, kind: str, piece: int = 0) -> str:
        return piece_file(rank, layer, kind, piece, self.pieces(rank))

    def execution_order(self, rank: int) -> list[tuple[int, str, int]]:
        return execution_order(self.config, self.pieces(rank))

    def block_files(self, rank: int) -> list[str]:
        """The device's files in execution order."""
        return [self.piece_path(rank, *key) for key in self.execution_order(rank)]


def read_uncached(path: Path) -> bytes:
    """Read a whole file, then tell the kernel to drop its pages: streamed weights must
    not pile up in the page cache inside a device's memory limit."""
    with open(path, "rb") as f:
        data = f.read()
        drop_file_cache(f.fileno())
    return data


# --- zero-copy reading of safetensors files ------------------------------------------

READ_CHUNK = 8 << 20  # bytes per system call of a buffered read (then dropped from the page cache)
DIRECT_CHUNK = 32 << 20  # bytes per O_DIRECT read: bigger requests stream faster (dd: 4 MiB 608, 64 MiB 784 MB/s)
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the system has none
DIRECT_ALIGN = 4096   # O_DIRECT wants the buffer address, file offset and length aligned to this


def aligned_bytes(nbytes: int) -> int:
    """What `aligned_empty(nbytes)` allocates: nbytes rounded up to whole DIRECT_ALIGN pages."""
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A (aligned_bytes(nbytes),) uint8 buffer on fresh anonymous pages (page-aligned start and
    length), so `read_into` can fill it with O_DIRECT; unmapped when the last view goes."""
    size = aligned_bytes(nbytes)
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)


def read_into(path: str | Path, buf: torch.Tensor) -> tuple[int, os.stat_result]:
    """Read the whole file at `path` into the front of `buf` (1-D uint8, large enough).
    Returns (bytes read, fstat of the file read). Raises FileNotFoundError if missing.

    The page cache is kept out of a device's memory limit either way: with O_DIRECT (when
    `buf` comes from `aligned_empty` and the file system takes it) the kernel reads into
    `buf` without caching, and on a shared disk several devices' streams go faster and cost
    half the CPU (measured: 4 concurrent readers, 16 MiB pieces, 1.6x the throughput of
    buffered reads); otherwise the file is read chunk by chunk and each chunk's pages dropped
    as soon as it is copied."""
    view = memoryview(buf.numpy()).cast("B")
    aligned = buf.numel() % DIRECT_ALIGN == buf.data_ptr() % DIRECT_ALIGN == 0
    fd, direct = _open(path, aligned and bool(O_DIRECT))
    try:
        st = os.fstat(fd)
        if st.st_size > len(view):
            raise StoreError(f"{path} has {st.st_size} bytes, more than the {len(view)}-byte buffer (manifest out of date?)")
        if direct and _read_direct(fd, view, st.st_size, path):
            return st.st_size, st
        if direct:  # the file system refused an aligned read: the same descriptor, buffered
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
        _read_buffered(fd, view, st.st_size, path)
        return st.st_size, st
    finally:
        os.close(fd)


def _open(path: str | Path, direct: bool) -> tuple[int, bool]:
    """(descriptor, whether it is O_DIRECT): O_DIRECT if asked and the file system takes it
    (some refuse it at open with EINVAL). FileNotFoundError if the file is missing."""
    if direct:
        try:
            return os.open(path, os.O_RDONLY | O_DIRECT), True
        except FileNotFoundError:
            raise
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


def _read_direct(fd: int, view: memoryview, size: int, path) -> bool:
    """O_DIRECT read of the whole file; False if the file system refuses aligned reads."""
    done = 0
    while done < size:
        end = min(len(view), done + DIRECT_CHUNK)                # aligned: len(view) is
        try:
            n = os.preadv(fd, [view[done:end]], done)
        except OSError:
            if done == 0:
                return False
            raise
        if n == 0:
            raise StoreError(f"{path} shrank while being read ({done} of {size} bytes)")
        done += n
        if n % DIRECT_ALIGN and done < size:                      # a short read off the grid
            raise StoreError(f"{path} changed while being read ({done} of {size} bytes)")
    return True


def _read_buffered(fd: int, view: memoryview, size: int, path) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done : min(size, done + READ_CHUNK)]], done)
        if n == 0:
            raise StoreError(f"{path} shrank while being read ({done} of {size} bytes)")
        drop_file_cache(fd, done, n)
        done += n


def parse_header(prefix: bytes | memoryview, where: str = "") -> tuple[dict, int]:
    """(header dict without __metadata__, offset of the data section) of a safetensors file,
    from the file's first bytes."""
    if len(prefix) < 8:
        raise StoreError(f"{where}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if 8 + n > len(prefix):
        raise StoreError(f"{where}: safetensors header of {n} bytes runs past the data read")
    try:
        header = json.loads(bytes(prefix[8 : 8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{where}: unreadable safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def tensors_from_buffer(buf: torch.Tensor, size: int, where: str = "") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file held in buf[:size], as views of `buf` (no copy).
    A tensor whose offset does not suit its dtype's alignment is copied out instead."""
    header, base = parse_header(memoryview(buf.numpy())[: min(size, 1 << 24)], where)
    out = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise StoreError(f"{where}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        start, end = (base + o for o in info["data_offsets"])
        shape = info["shape"]
        if not base <= start <= end <= size:
            raise StoreError(f"{where}: tensor {name} lies outside the file")
        raw = buf[start:end]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if start % itemsize:
            raw = raw.clone()  # misaligned: one small copy rather than a wrong view
        out[name] = raw.view(dtype).view(shape)
    return out


def read_tensor(path: str | Path, header: dict, base: int, name: str,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor of a safetensors file (or its rows [a, b) along the first dimension), read
    with pread into its own memory (no mmap, so nothing of the file stays mapped or cached
    after the call)."""
    info = header[name]
    start, end = (base + o for o in info["data_offsets"])
    shape = list(info["shape"])
    if rows is not None:
        row_bytes = (end - start) // shape[0]
        a, b = rows
        if not 0 <= a <= b <= shape[0]:
            raise StoreError(f"{path}: rows {a}..{b} of {name} are outside its {shape[0]} rows")
        start, end, shape[0] = start + a * row_bytes, start + b * row_bytes, b - a
    buf = torch.empty(end - start, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < end - start:
            n = os.preadv(fd, [view[done : min(end - start, done + READ_CHUNK)]], start + done)
            if n == 0:
                raise StoreError(f"{path}: tensor {name} is cut short")
            done += n
        drop_file_cache(fd, start, end - start)
    finally:
        os.close(fd)
    return buf.view(SAFETENSORS_DTYPES[info["dtype"]]).view(shape)


def hash_file(path: str | Path) -> tuple[str, os.stat_result]:
    """sha256 of a file read in READ_CHUNK pieces into one small buffer, each dropped from
    the page cache: a large file (a 2 GB embedding) is verified without being held."""
    digest = hashlib.sha256()
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        done = 0
        while done < st.st_size:
            n = os.preadv(fd, [view], done)
            if n == 0:
                raise StoreError(f"{path} shrank while being read ({done} of {st.st_size} bytes)")
            digest.update(view[:n])
            drop_file_cache(fd, done, n)
            done += n
        return digest.hexdigest(), st
    finally:
        os.close(fd)


def read_header(path: str | Path) -> tuple[dict, int]:
    """The safetensors header of the file at `path` (see parse_header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StoreError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        return parse_header(head + f.read(n), str(path))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
    """Write `tensors` as a safetensors file, tensor by tensor (never the whole file as one
    bytes object), atomically, with its pages dropped from the page cache.
    Returns (sha256, size). Tensors are laid out by element size, largest first, so every
    tensor's offset suits its dtype (as safetensors itself does)."""
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {}, 0
    for n in names:
        t = tensors[n]
        header[n] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for n in names:
            data = memoryview(tensors[n].contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
        drop_file_cache(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest(), 8 + len(raw) + offset
