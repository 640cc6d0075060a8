"""Fuzzing the frame decoder (issue 16): whatever bytes arrive, `decode` raises
ProtocolError or returns a message, never another exception. Fixed seed and budget, so the
run is reproducible: random bytes, valid frames of every kind with bytes flipped, cut or
grown, and headers around arbitrary JSON bodies (deep nesting, huge numbers, NaN)."""
import json
import struct

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tpi.protocol import (MAGIC, MESSAGE_TYPES, VERSION, CollectiveDrill, ForwardStep,
                          GlooSetup, Hello, Partial, ProtocolError, Reply, RingSetup, decode,
                          encode)

FUZZ = settings(max_examples=500, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
VALID = [
    encode(Hello(version=VERSION, nonce="ab" * 32, name="pi", want_rank=2)),
    encode(Partial(torch.arange(12, dtype=torch.float32).reshape(3, 4)), step=7),
    encode(ForwardStep(seq=1, slots=[0], starts=[0], hidden=torch.ones(1, 2, 4))),
    encode(Reply(seq=3, breakdown={"compute_s": 0.5}, tensor=torch.ones(2, dtype=torch.bfloat16))),
    encode(RingSetup(generation=2, peers={"1": "ws://a:1"})),
    encode(GlooSetup(port=5, timeout=3.0)),
    encode(CollectiveDrill(seq=1, reps=2, shape=[3])),
]


def _decodes_or_refuses(data) -> None:
    try:
        decode(data, max_bytes=1 << 16)
    except ProtocolError:
        pass


@seed(20261206)
@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    _decodes_or_refuses(data)


@seed(20261206)
@FUZZ
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                        max_size=8),
       st.integers(-64, 64))
def test_mutated_valid_frames(frame, flips, grow):
    data = bytearray(frame)
    for pos, value in flips:
        data[pos % len(data)] = value
    data = data[:len(data) + grow] if grow < 0 else data + bytes(grow)
    _decodes_or_refuses(bytes(data))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)


@seed(20261206)
@FUZZ
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.one_of(
    st.dictionaries(st.sampled_from(["seq", "rank", "nonce", "port", "timeout", "breakdown",
                                     "memory", "peers", "shape", "slots", "version", "x"]),
                    JSON, max_size=5).map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b'{"seq":' + b"[" * 50000 + b"]" * 50000 + b"}",
                     b'{"seq":' + b"9" * 5000 + b"}", b'{"timeout":1' + b"0" * 400 + b"}",
                     b'{"timeout":NaN}', b'{"timeout":-Infinity}', b'{"seq":1e999}'])),
    st.lists(st.integers(0, 2**32 - 1), max_size=8), st.integers(0, 8))
def test_arbitrary_bodies_and_shapes(kind, body, shape, dtype):
    head = struct.pack("<4sBBBBQII", MAGIC, VERSION, kind, dtype, len(shape), 0, 0, len(body))
    _decodes_or_refuses(head + struct.pack(f"<{len(shape)}I", *shape) + body)
