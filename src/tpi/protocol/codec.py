"""The codec: frame layout constants, the message registry and `encode` / `decode`, for the
message types declared in messages.py (the package docstring has the frame layout)."""
from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

MAGIC = b"TPIW"
VERSION = 1
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 64 << 20  # a 2048-token x 8192-hidden float32 prefill is 64 MiB

_HEADER = struct.Struct("<4sBBBBQII")  # magic, version, kind, dtype, ndim, step, part, meta_len

# The allow-list of tensor dtypes on the wire. Code 0 means "no tensor in this frame".
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.int8: 6,
    torch.uint8: 7,
}
DTYPES_BY_CODE: dict[int, torch.dtype] = {c: d for d, c in DTYPE_CODES.items()}
DTYPES_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in DTYPE_CODES}
_ITEMSIZE: dict[int, int] = {c: d.itemsize for d, c in DTYPE_CODES.items()}


class ProtocolError(ValueError):
    """A frame or message that does not follow this protocol."""


def dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16, for the allow-listed dtypes only."""
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        raise ProtocolError(f"dtype {name!r} not allowed on the wire "
                            f"(allowed: {sorted(DTYPES_BY_NAME)})") from None


def step_of(epoch: int, counter: int) -> int:
    """The u64 step stamped on frames: epoch in the high 32 bits, counter in the low."""
    return (epoch << 32) | counter


# ---------------------------------------------------------------------------------------
# Message types. CHANNEL says which queue the receiver routes a kind to; ORIGIN says who
# may send it ("hub" = master, "worker", "any"): anything else is rejected on arrival.


class Message:
    KIND: ClassVar[int]
    CHANNEL: ClassVar[str]   # "handshake" | "collective" | "setup" | "control" | "link"
    ORIGIN: ClassVar[str]    # "hub" | "worker" | "any"
    _TENSOR: ClassVar[str | None]      # the field carried as the frame's tensor, if any
    _TENSOR_OPTIONAL: ClassVar[bool]   # annotated `torch.Tensor | None`
    _FIELDS: ClassVar[dict[str, Any]]  # non-tensor field name -> type
    _REQUIRED: ClassVar[frozenset[str]]


MESSAGE_TYPES: dict[int, type[Message]] = {}


def message(kind: int, channel: str, origin: str):
    """Register a frozen dataclass as the message type bound to `kind`."""

    def register(cls):
        cls = dataclass(frozen=True)(cls)
        if kind in MESSAGE_TYPES or not 0 < kind < 256:
            raise ValueError(f"message kind {kind} reused or out of range")
        hints = typing.get_type_hints(cls)
        tensor_field, optional, fields, required = None, False, {}, set()
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if tp is torch.Tensor or tp == (torch.Tensor | None):
                if tensor_field is not None:
                    raise ValueError(f"{cls.__name__}: at most one tensor field")
                tensor_field, optional = f.name, tp is not torch.Tensor
                continue
            fields[f.name] = tp
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.add(f.name)
        cls.KIND, cls.CHANNEL, cls.ORIGIN = kind, channel, origin
        cls._TENSOR, cls._TENSOR_OPTIONAL = tensor_field, optional
        cls._FIELDS, cls._REQUIRED = fields, frozenset(required)
        MESSAGE_TYPES[kind] = cls
        return cls

    return register


# ---------------------------------------------------------------------------------------
# The codec


class Header(NamedTuple):
    kind: int
    dtype: int
    shape: tuple[int, ...]
    step: int
    part: int
    meta_len: int
    body: int       # offset of the JSON body; the tensor starts at body + meta_len


class Frame(NamedTuple):
    step: int
    part: int
    msg: Message


def _check_host() -> None:
    if sys.byteorder != "little":
        raise ProtocolError("tensor frames are little-endian; big-endian hosts are not supported")


def encode(msg: Message, *, step: int = 0, part: int = 0,
           wire_dtype: torch.dtype | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """One frame for `msg`. `wire_dtype` casts the tensor field (e.g. bfloat16 halves bytes)."""
    cls = type(msg)
    if cls.KIND not in MESSAGE_TYPES:
        raise ProtocolError(f"{cls.__name__} is not a registered message")
    if not 0 <= step < 1 << 64 or not 0 <= part < 1 << 32:
        raise ProtocolError(f"step {step} / part {part} out of range")
    tensor = getattr(msg, cls._TENSOR) if cls._TENSOR else None
    if cls._FIELDS:
        meta = json.dumps({k: getattr(msg, k) for k in cls._FIELDS},
                          separators=(",", ":")).encode()
    else:
        meta = b""
    if tensor is None:
        if cls._TENSOR and not cls._TENSOR_OPTIONAL:
            raise ProtocolError(f"{cls.__name__}.{cls._TENSOR} is required")
        head = _HEADER.pack(MAGIC, VERSION, cls.KIND, 0, 0, step, part, len(meta))
        data = head + meta
    else:
        _check_host()
        t = tensor.detach()
        if wire_dtype is not None and t.dtype != wire_dtype:
            t = t.to(wire_dtype)
        code = DTYPE_CODES.get(t.dtype)
        if code is None:
            raise ProtocolError(f"dtype {t.dtype} not allowed on the wire")
        if t.dim() > MAX_NDIM:
            raise ProtocolError(f"{t.dim()} dimensions > {MAX_NDIM}")
        t = t.cpu().contiguous()
        data = b"".join((frame_header(cls, t.dtype, t.shape, step, part, len(meta)), meta,
                         tensor_bytes(t)))
    if len(data) > max_bytes:
        raise ProtocolError(f"{cls.__name__} frame of {len(data)} bytes exceeds the "
                            f"{max_bytes}-byte limit")
    return data


def frame_header(cls: type[Message], dtype: torch.dtype, shape, step: int, part: int = 0,
                 meta_len: int = 0) -> bytes:
    """The header (with the shape) of a `cls` frame carrying a tensor; what `encode` writes,
    for senders that send the tensor's bytes without joining them (comm/star.py)."""
    return _HEADER.pack(MAGIC, VERSION, cls.KIND, DTYPE_CODES[dtype], len(shape), step, part,
                        meta_len) + struct.pack(f"<{len(shape)}I", *shape)


_STEP = struct.Struct("<Q")
_STEP_AT = 8  # offset of the step in the header (after magic, version, kind, dtype, ndim)


def set_step(frame: bytearray, step: int) -> None:
    """Rewrite the step of a frame made by `frame_header` (senders reuse one buffer)."""
    _STEP.pack_into(frame, _STEP_AT, step)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # (numel * itemsize,)


def read_header(data: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES) -> Header:
    """Validate everything but the body: size, magic, version, kind, dtype, shape vs bytes."""
    if isinstance(data, str):
        raise ProtocolError("text frame: this protocol uses binary frames only")
    n = len(data)
    if n > max_bytes:
        raise ProtocolError(f"frame of {n} bytes exceeds the {max_bytes}-byte limit")
    if n < _HEADER.size:
        raise ProtocolError(f"truncated frame: {n} bytes < {_HEADER.size}-byte header")
    magic, version, kind, dcode, ndim, step, part, meta_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind}")
    if dcode and dcode not in DTYPES_BY_CODE:
        raise ProtocolError(f"dtype code {dcode} not in the allow-list")
    if dcode and cls._TENSOR is None:
        raise ProtocolError(f"{cls.__name__} carries no tensor, frame has one")
    if not dcode and ndim:
        raise ProtocolError(f"{cls.__name__}: shape given without a tensor")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"{ndim} dimensions > {MAX_NDIM}")
    body = _HEADER.size + 4 * ndim
    if n < body + meta_len:
        raise ProtocolError(f"truncated {cls.__name__} frame: {n} bytes, header announces "
                            f"at least {body + meta_len}")
    shape = struct.unpack_from(f"<{ndim}I", data, _HEADER.size)
    if dcode and math.prod(max(d, 1) for d in shape) * _ITEMSIZE[dcode] > max_bytes:
        raise ProtocolError(f"{cls.__name__}: shape {list(shape)} exceeds the "
                            f"{max_bytes}-byte frame limit")
    if dcode:
        want = math.prod(shape) * _ITEMSIZE[dcode]
        got = n - body - meta_len
        if got != want:
            what = "truncated" if got < want else "overlong"
            raise ProtocolError(f"{what} {cls.__name__} frame: shape {list(shape)} of "
                                f"{DTYPES_BY_CODE[dcode]} needs {want} payload bytes, "
                                f"got {got}")
    elif n != body + meta_len:
        raise ProtocolError(f"{cls.__name__} frame has {n - body - meta_len} trailing bytes")
    return Header(kind, dcode, shape, step, part, meta_len, body)


def decode(data: bytes | str, *, max_bytes: int = DEFAULT_MAX_BYTES,
           expect: type[Message] | tuple[type[Message], ...] | None = None,
           step: int | None = None, shape: tuple[int, ...] | None = None,
           dtype: torch.dtype | None = None, header: Header | None = None) -> Frame:
    """Parse and validate one frame; the `expect`/`step`/`shape`/`dtype` the caller knows
    are checked too. Raises ProtocolError with what was wrong, and nothing else."""
    try:
        return _decode(data, max_bytes, expect, step, shape, dtype, header)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, RuntimeError,
            MemoryError) as e:  # a check above missed a case: still the peer's fault
        raise ProtocolError(f"undecodable frame ({type(e).__name__}: {e})"[:300]) from None


def _decode(data, max_bytes, expect, step, shape, dtype, header) -> Frame:
    h = header if header is not None else read_header(data, max_bytes)
    cls = MESSAGE_TYPES[h.kind]
    if expect is not None:
        allowed = expect if isinstance(expect, tuple) else (expect,)
        if cls not in allowed:
            raise ProtocolError(f"unexpected {cls.__name__} frame (expected "
                                f"{' or '.join(c.__name__ for c in allowed)})")
    if step is not None and h.step != step:
        raise ProtocolError(f"{cls.__name__} for step {_fmt(h.step)}, expected {_fmt(step)}")
    values = _decode_meta(cls, data, h)
    if cls._TENSOR:
        if not h.dtype:
            if not cls._TENSOR_OPTIONAL:
                raise ProtocolError(f"{cls.__name__} without its tensor")
            values[cls._TENSOR] = None
        else:
            tdtype = DTYPES_BY_CODE[h.dtype]
            if dtype is not None and tdtype != dtype:
                raise ProtocolError(f"{cls.__name__} tensor is {tdtype}, expected {dtype}")
            if shape is not None and tuple(h.shape) != tuple(shape):
                raise ProtocolError(f"{cls.__name__} tensor shape {list(h.shape)}, "
                                    f"expected {list(shape)}")
            values[cls._TENSOR] = _tensor(data, h, tdtype)
    return Frame(h.step, h.part, cls(**values))


def _tensor(data: bytes, h: Header, dtype: torch.dtype) -> torch.Tensor:
    _check_host()
    start = h.body + h.meta_len
    if start == len(data):
        return torch.empty(h.shape, dtype=dtype)
    raw = bytearray(memoryview(data)[start:])  # one copy, owned and writable
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(h.shape)


def _decode_meta(cls: type[Message], data: bytes, h: Header) -> dict[str, Any]:
    if not h.meta_len:
        values: dict[str, Any] = {}
    else:
        try:
            values = json.loads(bytes(memoryview(data)[h.body:h.body + h.meta_len]),
                                parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # not JSON, NaN, >4300-digit int, too deep
            raise ProtocolError(f"{cls.__name__}: body is not JSON "
                                f"({type(e).__name__}: {e})"[:300]) from None
        if not isinstance(values, dict):
            raise ProtocolError(f"{cls.__name__}: body is not a JSON object")
    unknown = values.keys() - cls._FIELDS.keys()
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    missing = cls._REQUIRED - values.keys()
    if missing:
        raise ProtocolError(f"{cls.__name__}: missing fields {sorted(missing)}")
    for name, value in values.items():
        tp = cls._FIELDS[name]
        if not _conforms(value, tp):
            raise ProtocolError(f"{cls.__name__}.{name}: {value!r:.60} is not {_tname(tp)}")
        if tp is float:
            values[name] = float(value)
    return values


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number this protocol accepts")


_INT_LIMIT = 1 << 63


def _conforms(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) \
            and -_INT_LIMIT <= value < _INT_LIMIT
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        try:
            return math.isfinite(float(value))    # 10**400 overflows, 1e400 is inf
        except OverflowError:
            return False
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        _, val = typing.get_args(tp)
        return (isinstance(value, dict) and all(isinstance(k, str) for k in value)
                and all(_conforms(v, val) for v in value.values()))
    raise TypeError(f"unsupported field type {tp!r}")


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _fmt(step: int) -> str:
    return f"{step >> 32}:{step & 0xFFFFFFFF}"


__all__ = [
    "MAGIC", "VERSION", "DEFAULT_MAX_BYTES", "DTYPE_CODES", "ProtocolError", "Message",
    "MESSAGE_TYPES", "message", "Header", "Frame", "encode", "decode", "read_header",
    "frame_header", "set_step", "tensor_bytes",
    "dtype_from_name", "step_of",
]
