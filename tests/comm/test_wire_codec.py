"""The wire codec: round trips for every allowed dtype, and every kind of bad frame."""
import json
import struct

import pytest
import torch

from tpi.protocol import (MAGIC, VERSION, Assignment, Error, ForwardStep, Hello, Partial,
                          ProtocolError, Reduced, Reply, RingSetup, Shutdown,
                          Welcome, decode, encode, read_header)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int8,
          torch.uint8]
HEADER = struct.Struct("<4sBBBBQII")


def sample(dtype, shape=(2, 3, 5)):
    return (torch.randn(shape) * 50).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (7,), (), (0, 4), (2, 1, 1, 1, 1, 1, 1, 3)])
def test_tensor_round_trip(dtype, shape):
    t = sample(dtype, shape)
    f = decode(encode(Partial(t), step=(3 << 32) | 9, part=4))
    assert (f.step, f.part) == ((3 << 32) | 9, 4)
    assert f.msg.tensor.dtype == dtype and f.msg.tensor.shape == t.shape
    assert torch.equal(f.msg.tensor, t)


def test_non_contiguous_and_wire_dtype():
    t = torch.randn(6, 4).t()                           # (4, 6), non-contiguous
    f = decode(encode(Reduced(t), wire_dtype=torch.bfloat16))
    assert f.msg.tensor.dtype == torch.bfloat16
    assert torch.equal(f.msg.tensor, t.to(torch.bfloat16))
    assert len(encode(Reduced(t), wire_dtype=torch.bfloat16)) < len(encode(Reduced(t)))


def test_decoded_tensor_is_writable_and_owned():
    data = encode(Partial(torch.ones(4)))
    out = decode(data).msg.tensor
    out += 1                                            # no warning, no aliasing of `data`
    assert torch.equal(decode(data).msg.tensor, torch.ones(4))


def test_control_messages_round_trip():
    msgs = [
        Hello(version=VERSION, nonce="ab" * 32, name="pi-4", want_rank=2),
        Welcome(rank=1, world_size=3, allreduce="ring", wire_dtype="bfloat16", proof="00"),
        Error(code="auth", message="join token rejected"),
        Assignment(rank=2, world_size=4, store="/data/stores/ab12", store_id="ab12",
                   options={"max_seq": 64, "window": 2, "kv_dtype": None}, shards_url="http://m:8000"),
        ForwardStep(seq=7, slots=[0, 3], starts=[5, 9], hidden=torch.randn(2, 1, 576)),
        Shutdown(), Reply(seq=3), Reply(seq=4, tensor=torch.arange(3)),
        Reply(seq=5, memory={"rss_bytes": 1 << 30, "budget_bytes": None}, breakdown={"compute_s": 0.25}),
        Reply(seq=6, ok=False, error="no shard loaded"),
        RingSetup(generation=2, peers={"1": "ws://10.0.0.2:4000"}),
    ]
    for m in msgs:
        got = decode(encode(m, step=5 << 32)).msg
        assert type(got) is type(m)
        for k, v in vars(m).items():
            w = getattr(got, k)
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v


def frame(kind=10, dtype=1, shape=(4,), step=0, part=0, meta=b"", payload=None,
          magic=MAGIC, version=VERSION):
    head = HEADER.pack(magic, version, kind, dtype, len(shape), step, part, len(meta))
    if payload is None:
        payload = b"\0" * (4 * int(torch.tensor(shape).prod()) if shape else 4)
    return head + struct.pack(f"<{len(shape)}I", *shape) + meta + payload


def test_frame_helper_builds_valid_frames():
    assert decode(frame()).msg.tensor.shape == (4,)


@pytest.mark.parametrize("data,match", [
    ("a text frame", "text frame"),
    (b"TPIW\x01", "truncated frame"),
    (frame(magic=b"HTTP"), "bad magic"),
    (frame(version=VERSION + 1), "protocol version"),
    (frame(kind=200), "unknown message kind"),
    (frame(dtype=99), "allow-list"),
    (frame(payload=b"\0" * 15), "truncated Partial"),
    (frame(payload=b"\0" * 17), "overlong Partial"),
    (frame(shape=(2, 3), payload=b"\0" * 16), "needs 24 payload bytes, got 16"),
    (frame(kind=33, dtype=1), "carries no tensor"),               # Shutdown + tensor
    (frame(kind=10, dtype=0, shape=(), payload=b""), "without its tensor"),
    (frame(kind=33, dtype=0, shape=(), meta=b"{bad", payload=b""), "not JSON"),
    (frame(kind=33, dtype=0, shape=(), meta=b"[1]", payload=b""), "not a JSON object"),
    (frame(kind=33, dtype=0, shape=(), meta=b'{"why":1}', payload=b""), "unknown fields"),
    (frame(kind=5, dtype=0, shape=(), meta=b'{"code":"x"}', payload=b""), "missing fields"),
    (frame(kind=34, dtype=0, shape=(), meta=b'{"seq":"1"}', payload=b""), "is not int"),
    (frame(kind=34, dtype=0, shape=(), meta=b'{"seq":true}', payload=b""), "is not int"),
    (frame(kind=31, dtype=1, shape=(1,),
           meta=json.dumps({"seq": 1, "slots": [0], "starts": [1, "a"]}).encode()), "starts"),
    (frame(kind=33, dtype=0, shape=(), payload=b"xx"), "trailing bytes"),
    (frame(shape=(1,) * 9, payload=b"\0" * 4), "dimensions"),
])
def test_malformed_frames_are_rejected(data, match):
    with pytest.raises(ProtocolError, match=match):
        decode(data)


def test_expectations_of_the_receiver():
    data = encode(Partial(torch.ones(2, 3)), step=7)
    with pytest.raises(ProtocolError, match="unexpected Partial"):
        decode(data, expect=Reduced)
    with pytest.raises(ProtocolError, match="step"):
        decode(data, step=8)
    with pytest.raises(ProtocolError, match="shape"):
        decode(data, shape=(3, 2))
    with pytest.raises(ProtocolError, match="bfloat16"):
        decode(data, dtype=torch.bfloat16)
    assert decode(data, expect=(Reduced, Partial), step=7, shape=(2, 3),
                  dtype=torch.float32).msg.tensor.shape == (2, 3)


def test_size_limit_both_ways():
    big = Partial(torch.zeros(1000))                    # 4000 bytes of payload
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(big, max_bytes=2000)
    data = encode(big)
    with pytest.raises(ProtocolError, match="exceeds"):
        read_header(data, max_bytes=2000)


def test_disallowed_dtypes_and_bad_messages_do_not_encode():
    with pytest.raises(ProtocolError, match="not allowed"):
        encode(Partial(torch.zeros(2, dtype=torch.float64)))
    with pytest.raises(ProtocolError, match="required"):
        encode(Partial(None))
    with pytest.raises(ProtocolError, match="out of range"):
        encode(Shutdown(), step=-1)
