"""Malformed, truncated, oversized and wrongly typed frames, before and after joining, are
refused and logged; the hub keeps serving and a real worker then all-reduces correctly."""
import asyncio
import logging
import struct
import threading
import time

import pytest
import torch
from tpi.comm.base import CommError
from tpi.comm.drill import run_master
from tpi.protocol import Abort, Error, Partial, Reduced, Welcome, encode

from rawpeer import RawPeer  # tests/comm is on sys.path (its conftest)

MAX = 1 << 20


async def session(url, token, frames, authenticate):
    """Send `frames` (after the handshake, sealed, if `authenticate`); return (replies,
    close code)."""
    peer = await RawPeer.open(url)
    if authenticate:
        await peer.join(token)
    for f in frames:
        await peer.send(f)
    got = await peer.recv_all()
    return got, peer.ws.close_code


def partial_header_only(shape=(576,)):
    full = encode(Partial(torch.zeros(shape)))
    return full[:len(full) - 100]                      # truncated payload


GOOD = encode(Partial(torch.zeros(4)))                 # header 24 B, shape at 24, payload 16 B
BAD = {
    "text": "hello?",
    "garbage": b"\x00\x01GET / HTTP/1.1\r\n",
    "truncated": partial_header_only(),
    "bad_dtype": GOOD[:6] + b"\x63" + GOOD[7:],           # dtype code 99
    "hub_only_kind": encode(Reduced(torch.zeros(4))),
    "lying_shape": GOOD[:24] + struct.pack("<I", 5) + GOOD[28:],   # shape [5], 16 bytes
}


@pytest.mark.parametrize("authenticate", [False, True])
@pytest.mark.parametrize("kind", sorted(BAD) + ["oversized", "wrong_hello"])
def test_bad_frame_is_refused_and_logged(make_group, caplog, token, authenticate, kind):
    caplog.set_level(logging.WARNING, logger="tpi.comm.hub")
    g = make_group(2, max_bytes=MAX)
    if kind == "oversized":                             # over the limit before / after joining
        frame = encode(Partial(torch.zeros(MAX // 4 + 10 if authenticate else 1100)),
                       max_bytes=4 * MAX)
    elif kind == "wrong_hello":                         # a Welcome where Hello belongs
        frame = encode(Welcome(rank=1, world_size=2, allreduce="star", wire_dtype="float32",
                               proof=""))
    else:
        frame = BAD[kind]
    replies, code = asyncio.run(session(g.hub.url, token, [frame], authenticate))
    if kind == "oversized":
        assert code == 1009                            # websockets' "message too big"
    else:
        assert code == 1008
        errors = [m for m in replies if isinstance(m, Error)]
        assert errors and errors[0].code == "protocol" and errors[0].message
    deadline = time.monotonic() + 5                    # logged on the hub (its loop may
    while not caplog.records and time.monotonic() < deadline:  # log just after closing)
        time.sleep(0.02)
    assert caplog.records
    # the hub still serves: a real worker takes the (freed) rank and all-reduces
    comm = g.start()
    r = run_master(g.hub, comm, reps=3, shape=[1, 1, 576])
    assert r.max_error() <= 1e-5 * float(r.expected.abs().max())


def test_wrong_shape_fails_the_collective_not_the_hub(make_group, token):
    """An authenticated peer sends a partial of the wrong shape during an all_reduce: the
    master's all_reduce raises CommError, the peer is told (Abort), the hub lives on."""
    g = make_group(2, max_bytes=MAX, timeout=5.0)
    comm = g.hub.communicator()
    result = {}

    def master():
        g.hub.wait_for_workers(timeout=10)
        try:
            comm.all_reduce(torch.ones(1, 1, 576))
        except CommError as e:
            result["error"] = str(e)

    async def bad_peer():
        peer = await RawPeer.open(g.hub.url)
        await peer.join(token)
        data = peer.data_connection()
        t = threading.Thread(target=master)
        t.start()
        data.send(encode(Partial(torch.ones(1, 1, 500)), step=0))
        got = await peer.recv_all()                    # the hub closes the peer
        t.join(10)
        return got

    replies = asyncio.run(bad_peer())
    assert "shape [1, 1, 500]" in result["error"] and "expected [1, 1, 576]" in result["error"]
    assert any(isinstance(m, Abort) for m in replies)
    g.procs.clear()
    comm = g.start()
    r = run_master(g.hub, comm, reps=3, shape=[1, 1, 576], seq=1)  # its broadcast opens a
                                                                   # fresh epoch
    assert r.max_error() <= 1e-5 * float(r.expected.abs().max())
