"""Joining: a wrong token is refused with a clear message on both sides, the token never
travels, the worker checks the hub's proof too, and TLS (wss://) works."""
import asyncio
import logging
import shutil
import subprocess
import sys
import threading

import pytest
from websockets.asyncio.server import serve

from tpi.comm.base import CommError
from tpi.comm.client import StarClient
from tpi.comm.drill import run_master
from tpi.comm.handshake import JoinRefused
from tpi.comm.hub import StarHub
from tpi.protocol import Challenge, Welcome, encode


def test_wrong_token_is_refused_clearly_and_the_hub_keeps_serving(make_group, caplog):
    caplog.set_level(logging.WARNING, logger="tpi.comm.hub")
    g = make_group(2)
    script = ("from tpi.comm.client import StarClient\n"
              f"StarClient.connect({g.hub.url!r}, 'not-the-token')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "JoinRefused: hub refused: join token rejected" in proc.stderr
    assert any("refused" in r.message and "join token rejected" in r.message
               for r in caplog.records)
    comm = g.start()                                         # the right token still works
    assert run_master(g.hub, comm, reps=3, shape=[4]).max_error() < 1e-5


def test_wrong_token_in_process_and_group_full(token):
    with StarHub(2, token) as hub:
        with pytest.raises(JoinRefused, match="join token rejected") as e:
            StarClient.connect(hub.url, "wrong")
        assert e.value.code == "auth"
        with StarClient.connect(hub.url, token) as c:
            assert c.rank == 1
            with pytest.raises(JoinRefused, match="group full"):
                StarClient.connect(hub.url, token)
        with StarClient.connect(hub.url, token, want_rank=1) as c:   # the rank is free again
            assert c.rank == 1


def test_hub_for_a_plan_admits_only_the_planned_devices(token):
    """A re-plan's hub (expected_names) keeps its ranks for the devices planned for: one that
    registered meanwhile is told to wait for the next re-plan, and the planned one gets in."""
    with StarHub(2, token, expected_names={"pi-1"}) as hub:
        with pytest.raises(JoinRefused, match="not in the current plan") as e:
            StarClient.connect(hub.url, token, name="laptop-7")
        assert e.value.code == "not_planned"
        with StarClient.connect(hub.url, token, name="pi-1") as c:
            assert c.rank == 1


def test_worker_refuses_a_hub_that_cannot_prove_the_token(token):
    """A rogue server that answers the challenge with a made-up proof. It also records
    what a worker sends: the token itself is never among it."""
    ready, port, heard = threading.Event(), [], []

    async def rogue(ws):
        heard.append(await ws.recv())                         # Hello
        await ws.send(encode(Challenge(nonce="00" * 32)))
        heard.append(await ws.recv())                         # AuthResponse, not checked
        await ws.send(encode(Welcome(rank=1, world_size=2, allreduce="star",
                                     wire_dtype="float32", proof="ab" * 32)))
        await asyncio.sleep(1)

    def run():
        async def main():
            async with serve(rogue, "127.0.0.1", 0, compression=None) as server:
                port.append(server.sockets[0].getsockname()[1])
                ready.set()
                await asyncio.sleep(5)
        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    ready.wait(5)
    with pytest.raises(JoinRefused, match="could not prove"):
        StarClient.connect(f"ws://127.0.0.1:{port[0]}", token)
    assert len(heard) == 2 and not any(token.encode() in m for m in heard)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.mark.parametrize("mode", ["star", "ring"])
def test_tls(make_group, cert, mode, token):
    from tpi.comm.tls import server_context

    g = make_group(3, mode, ssl_context=server_context(*cert),
                   worker_kwargs={"cafile": cert[0]})
    assert g.hub.url.startswith("wss://")
    comm = g.start()
    r = run_master(g.hub, comm, reps=5, shape=[1, 1, 576])
    assert r.max_error() <= 1e-5 * float(r.expected.abs().max())
    with pytest.raises(CommError, match="cannot join"):       # plain ws:// is not served
        StarClient.connect(g.hub.url.replace("wss://", "ws://"), token, handshake_timeout=3)
