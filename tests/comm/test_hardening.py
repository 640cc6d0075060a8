"""Issue 16's network findings, each reproduced against a real hub (and real worker
processes where one is needed) over real sockets: memory and handshakes before
authentication are bounded, a peer's bad frame always frees its rank, an on-path attacker
can neither inject frames nor alter Welcome, weak join tokens are refused, and the gloo
baseline's store listens on the hub's interface only."""
import asyncio
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tpi.comm import handshake
from tpi.comm.client import StarClient
from tpi.comm.conn import HANDSHAKE_MAX_BYTES
from tpi.comm.drill import run_master
from tpi.comm.hub import StarHub
from tpi.protocol import (MAGIC, VERSION, Error, Partial, Reply, Shutdown, encode)

from rawpeer import RawPeer  # tests/comm is on sys.path (its conftest)

TOKEN = "test-join-token-long-enough"


def _close_code(url: str, frame: bytes) -> int:
    async def run():
        ws = await connect(url, compression=None, max_size=None, proxy=None)
        sending = asyncio.ensure_future(ws.send(frame))      # the hub may close mid-way
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed:
            pass
        await asyncio.gather(sending, return_exceptions=True)
        return ws.close_code
    return asyncio.run(run())


def test_big_frames_before_authentication_are_refused_unread():
    """Finding 1: the hub took 64 MiB frames from anyone. Now a frame over 4 KiB before the
    join token is verified closes the connection (1009) from its header alone."""
    with StarHub(2, TOKEN, max_bytes=64 << 20) as hub:
        rss0 = psutil.Process().memory_info().rss
        frame = b"\0" * (8 << 20)                             # 8 MiB, 8 connections
        codes = [_close_code(hub.url, frame) for _ in range(8)]
        assert codes == [1009] * 8
        assert psutil.Process().memory_info().rss - rss0 < 48 << 20
        assert _close_code(hub.url, b"\0" * (HANDSHAKE_MAX_BYTES + 1)) == 1009
        with StarClient.connect(hub.url, TOKEN) as c:         # a real worker still joins
            assert c.rank == 1


def test_concurrent_handshakes_are_capped():
    """Finding 1: unauthenticated connections that stall in the handshake are capped
    (MAX_HANDSHAKES); the extra ones are told "busy" at once, and once the stalled ones time
    out a real worker joins."""
    with StarHub(2, TOKEN, handshake_timeout=2.0) as hub:
        async def run():
            idle = [await connect(hub.url, compression=None, proxy=None)
                    for _ in range(handshake.MAX_HANDSHAKES)]
            await asyncio.sleep(0.3)                          # all of them in the handshake
            extra = await connect(hub.url, compression=None, proxy=None)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(extra.recv(), 5)
            code = extra.close_code
            for ws in idle:
                await ws.close()
            return code
        assert asyncio.run(run()) == handshake.TRY_AGAIN_LATER
        with StarClient.connect(hub.url, TOKEN) as c:
            assert c.rank == 1


def test_a_workers_ring_listener_has_the_same_limits():
    with StarHub(2, TOKEN, allreduce="ring") as hub:
        with StarClient.connect(hub.url, TOKEN):
            deadline = time.monotonic() + 10
            while not hub.workers()[1].ring_url:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert _close_code(hub.workers()[1].ring_url, b"\0" * (1 << 20)) == 1009


def test_the_data_port_reads_24_bytes_before_authentication():
    with StarHub(2, TOKEN, handshake_timeout=2.0) as hub:
        s = socket.create_connection(("127.0.0.1", hub.data_port))
        s.sendall(b"GET / HTTP/1.1\r\n" + b"x" * (1 << 20))
        s.settimeout(5)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while s.recv(4096):
                s.sendall(b"x" * 65536)
        with StarClient.connect(hub.url, TOKEN) as c:
            assert c.rank == 1


def _frame(kind: int, body: bytes, dtype: int = 0, shape: tuple = ()) -> bytes:
    import struct
    return struct.pack("<4sBBBBQII", MAGIC, VERSION, kind, dtype, len(shape), 0, 0, len(body)) \
        + struct.pack(f"<{len(shape)}I", *shape) + body


BAD_BODIES = {
    "deep JSON": _frame(Reply.KIND, b'{"seq":' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "5000-digit int": _frame(Reply.KIND, b'{"seq":' + b"9" * 5000 + b"}"),
    "10**400 float": _frame(Reply.KIND, b'{"seq":1,"breakdown":{"compute_s":1' + b"0" * 400
                            + b"}}"),
    "NaN": _frame(Reply.KIND, b'{"seq":1,"breakdown":{"compute_s":NaN}}'),
    "absurd shape": _frame(Reply.KIND, b'{"seq":1}', 1, (0, 2**32 - 1, 2**32 - 1)),
}


@pytest.mark.parametrize("what", sorted(BAD_BODIES))
def test_a_joined_peers_bad_frame_frees_its_rank(make_group, what):
    """Finding 2: such frames escaped `decode` as other exceptions and left the rank taken
    for good. Now the peer is told why and disconnected, and a real worker takes its rank."""
    g = make_group(2, max_bytes=1 << 20)

    async def bad_peer():
        peer = await RawPeer.open(g.hub.url)
        await peer.join(TOKEN, want_rank=1)
        await peer.send(BAD_BODIES[what])
        return await peer.recv_all()

    replies = asyncio.run(bad_peer())
    assert any(isinstance(m, Error) and m.code == "protocol" for m in replies), replies
    comm = g.start(timeout=60)                              # rank 1 is free again
    r = run_master(g.hub, comm, reps=3, shape=[1, 1, 576])
    assert r.max_error() <= 1e-5 * float(r.expected.abs().max())


class Relay:
    """An on-path attacker: a TCP relay between a worker and the hub that can rewrite the
    hub's bytes and inject a WebSocket frame of its own towards the worker."""

    def __init__(self, hub_port: int, rewrite=None):
        self.hub_port, self.rewrite = hub_port, rewrite or (lambda b: b)
        self.to_worker = None
        self.ready = asyncio.Event()

    async def serve(self):
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _pipe(self, r_worker, w_worker):
        r_hub, w_hub = await asyncio.open_connection("127.0.0.1", self.hub_port)
        self.to_worker = w_worker
        self.ready.set()

        async def copy(r, w, change):
            while data := await r.read(65536):
                w.write(change(data))
                await w.drain()
            w.close()
        await asyncio.gather(copy(r_worker, w_hub, lambda b: b),
                             copy(r_hub, w_worker, self.rewrite), return_exceptions=True)

    def inject(self, payload: bytes) -> None:
        """One unmasked binary WebSocket frame (server -> client)."""
        assert len(payload) < 126
        self.to_worker.write(bytes([0x82, len(payload)]) + payload)


def _in_thread(coro_fn):
    """Run an asyncio relay in a thread of its own while the test drives a real client."""
    import threading
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop, asyncio.run_coroutine_threadsafe(coro_fn(), loop).result(10)


def test_an_on_path_attacker_cannot_inject_a_frame():
    """Finding 3: after relaying the handshake, an attacker could inject frames (Shutdown,
    altered sums). Now every frame carries a tag keyed from the handshake: the worker refuses
    the injected Shutdown and drops the connection instead of obeying it."""
    with StarHub(2, TOKEN) as hub:
        relay = Relay(hub.port)
        loop, port = _in_thread(relay.serve)
        client = StarClient.connect(f"ws://127.0.0.1:{port}", TOKEN)
        try:
            time.sleep(0.5)                                # the hub's first Ping has passed
            loop.call_soon_threadsafe(relay.inject, encode(Shutdown(reason="attacker")))
            with pytest.raises(Exception) as e:
                msg = client.recv_control(timeout=10)
                pytest.fail(f"the worker obeyed an injected {msg}")
            assert "authentication failed" in str(e.value)
        finally:
            client.close()
            loop.call_soon_threadsafe(loop.stop)


def test_an_on_path_attacker_cannot_alter_welcome():
    """Finding 3: Welcome's rank, world size and dtype were not covered by the hub's proof."""
    with StarHub(3, TOKEN) as hub:
        relay = Relay(hub.port, rewrite=lambda b: b.replace(b'"rank":1', b'"rank":2'))
        loop, port = _in_thread(relay.serve)
        try:
            with pytest.raises(handshake.JoinRefused, match="could not prove"):
                StarClient.connect(f"ws://127.0.0.1:{port}", TOKEN, want_rank=1)
        finally:
            loop.call_soon_threadsafe(loop.stop)


@pytest.mark.parametrize("token,refused", [("change-me-join-token", True), ("short-token", True),
                                           ("a-random-token-of-24-chars", False)])
def test_weak_join_tokens_are_refused_unless_insecure(token, refused):
    """Finding 4: the shipped default and short tokens ran. `tpi worker` now refuses them
    before connecting anywhere, unless --insecure."""
    def run(*extra) -> tuple[int | None, str]:
        """(exit code, stderr), or (None, stderr) once it is past the check and trying to
        connect (to a port where nothing listens)."""
        p = subprocess.Popen([sys.executable, "-m", "tpi_cli", "worker", "--master",
                              "ws://127.0.0.1:9", "--join-token", token, *extra],
                             stderr=subprocess.PIPE, text=True)
        lines = []
        try:
            for line in p.stderr:                    # ends when the process exits
                lines.append(line)
                if "cannot join" in line:
                    return None, "".join(lines)
            return p.wait(30), "".join(lines)
        finally:
            p.kill()
            p.wait(30)
    code, err = run()
    assert (code not in (None, 0) and "join token (--join-token" in err) == refused, err[-500:]
    if refused:
        code, err = run("--insecure")
        assert "join token (--join-token" not in err and "cannot join" in err, err[-500:]


def test_gloo_store_listens_on_the_hubs_interface_only(make_group):
    """Finding 9: `--allreduce gloo` opened its unauthenticated TCPStore on 0.0.0.0."""
    g = make_group(2, "gloo")
    comm = g.start(timeout=120)
    mine = [c for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"]
    assert mine and all(c.laddr.ip in ("127.0.0.1", "::1") for c in mine), mine
    x = torch.ones(4)
    assert run_master(g.hub, comm, reps=2, shape=[4]).max_error() < 1e-5 and x.sum() == 4
