"""Read GGUF files (llama.cpp's format): metadata, tensor directory, and one tensor at a time.

Our own parser of the header (the `gguf` package's GGUFReader memory-maps the file and takes
seconds on a 49k-token vocabulary; this takes a fraction of that, and names the cause of a
bad file). The `gguf` package supplies the type table and the numpy dequantizers.

Layout (little-endian): magic "GGUF", version (3), tensor count, metadata count, the metadata
(key, type, value), the tensor directory (name, dims, type, offset), padding to
`general.alignment` (32), then the tensor data. A tensor's dims are given fastest-first
(ne0 = the input width of a weight); as a row-major array it is (ne1, ne0): rows of ne0
values, each row a whole number of quantization blocks. So a row range is a byte range.

A model may be split over `NAME-00001-of-0000N.gguf` files (llama.cpp's gguf-split): the
metadata is read from the first, the tensors from all of them.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpi.host import drop_file_cache

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# The tensor types TPI reads (what Q4_K_M, Q5_K_M and Q8_0 files mix, and the legacy ones).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")


class GGUFError(ValueError):
    """The GGUF file is unreadable, truncated, or holds something TPI does not run."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str             # GGML type name: "Q4_K", "F16", ...
    shape: tuple[int, ...]     # row-major: (rows, width) for a matrix, (width,) for a vector
    path: Path                 # the file holding it
    offset: int                # absolute byte offset of its data in that file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, int(np.prod(self.shape[:-1])))


# metadata value types -> struct format (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


class _Cursor:
    def __init__(self, data: bytes, where: Path):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _NeedMore(self.pos + n)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _NUMPY:  # numeric arrays in one slice
                size = np.dtype(_NUMPY[item]).itemsize
                return np.frombuffer(self.take(count * size), dtype=_NUMPY[item]).tolist()
            return [self.value(item) for _ in range(count)]
        raise GGUFError(f"{self.where}: unknown metadata value type {vtype} at byte {self.pos}")


def _read_header(path: Path) -> tuple[dict, list[TensorInfo]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(min(size, 1 << 20))
        while True:
            try:
                return _parse(_Cursor(data, path), path, size)
            except _NeedMore as e:
                if len(data) >= size:
                    raise GGUFError(f"{path} is truncated: its header runs past the end of the file "
                                    f"({size} bytes, needs at least {e.args[0]})") from None
                data += f.read(len(data))  # a large vocabulary: read more of the header


def _parse(cur: _Cursor, path: Path, size: int) -> tuple[dict, list[TensorInfo]]:
    if cur.take(4) != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        raw.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    base = -(-cur.pos // align) * align
    tensors = []
    for name, dims, type_id, offset in raw:
        type_name = ggml_type_name(type_id)
        shape = tuple(int(d) for d in reversed(dims))
        nbytes = tensor_bytes(type_name, shape, name) if type_name in SUPPORTED_TYPES else 0
        info = TensorInfo(name, type_name, shape, path, base + offset, nbytes)
        if info.offset + nbytes > size:
            raise GGUFError(f"{path} is truncated: tensor {name} needs bytes up to {info.offset + nbytes}, "
                            f"the file has {size}")
        tensors.append(info)
    return meta, tensors


def ggml_type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def tensor_bytes(type_name: str, shape: tuple[int, ...], name: str = "") -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    width = shape[-1] if shape else 1
    if width % block:
        raise GGUFError(f"tensor {name}: width {width} is not a whole number of {type_name} blocks of {block}")
    return int(np.prod(shape[:-1])) * width // block * size


def split_files(path: Path) -> list[Path]:
    """All files of a (possibly split) GGUF model, given any one of them."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    files = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise GGUFError(f"split GGUF {path.name}: part(s) {', '.join(missing)} missing from {path.parent}")
    return files


class GGUFFile:
    """A GGUF model (one file or the parts of a split one): `metadata`, `tensors` by name, and
    `read(name, rows)` of one tensor's raw bytes."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise GGUFError(f"no GGUF file at {path}")
        self.files = split_files(path)
        self.metadata: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        for i, f in enumerate(self.files):
            meta, tensors = _read_header(f)
            if i == 0:
                self.metadata = meta
            for t in tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{f}: tensor {t.name} appears twice")
                self.tensors[t.name] = t

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor's raw bytes (with pread, no mapping), as uint8 (rows, row_bytes) for a
        matrix or (nbytes,) for a vector; `rows` [a, b) reads only those rows."""
        t = self.tensors[name]
        if t.type_name not in SUPPORTED_TYPES:
            raise GGUFError(f"tensor {name} has GGML type {t.type_name}, which TPI does not read "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
        n_rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        a, b = rows if rows is not None else (0, n_rows)
        if not 0 <= a <= b <= n_rows:
            raise GGUFError(f"rows {a}..{b} of {name} are outside its {n_rows} rows")
        rb = t.row_bytes if len(t.shape) > 1 else t.nbytes
        buf = np.empty((b - a) * rb, dtype=np.uint8)
        fd = os.open(t.path, os.O_RDONLY)
        try:
            done, start = 0, t.offset + a * rb
            view = memoryview(buf)
            while done < len(buf):
                n = os.preadv(fd, [view[done:]], start + done)
                if n == 0:
                    raise GGUFError(f"{t.path} is truncated: tensor {name} is cut short")
                done += n
            drop_file_cache(fd, start, len(buf))
        finally:
            os.close(fd)
        return buf.reshape(b - a, rb) if len(t.shape) > 1 else buf


def dequantize(raw: np.ndarray, type_name: str, width: int) -> np.ndarray:
    """Raw rows (rows, row_bytes) or a raw vector of `type_name` -> float32 (rows, width) / (width,)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    if type_name == "F32":
        out = raw.view(np.float32)
    elif type_name == "F16":
        out = raw.view(np.float16).astype(np.float32)
    elif type_name == "BF16":  # bfloat16 is the top half of a float32
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        out = gguf_dequantize(raw, GGMLQuantizationType[type_name]).astype(np.float32, copy=False)
    return out.reshape(*raw.shape[:-1], width)
