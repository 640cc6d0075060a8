"""The API's server holds its limits against a real `tpi master` (tpi.wsgi): an oversized
body is refused from its headers alone, a flood of half-sent headers holds no request
thread and is dropped after the header deadline, and requests keep being answered."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import requests

from procs import master, wait_for  # noqa: F401  (pytest fixtures)
from tpi.wsgi import Limits

MSG = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def test_oversized_body_is_refused_from_its_headers(master):
    """A 200 MiB Content-Length gets 413 before any of the body is sent."""
    with connect(master.port) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n{" % (200 << 20))
        started = time.monotonic()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert time.monotonic() - started < 10
    assert requests.post(master.url + "/v1/chat/completions", json=MSG, timeout=60).status_code == 200


def test_slow_header_flood_holds_no_threads_and_is_dropped(master):
    """More half-sent requests than the server has request threads: the master's threads do
    not grow with them, a normal request is answered meanwhile, and each slow connection
    is closed once the header deadline passes."""
    pid = master.proc.pid
    before = threads_of(pid)
    flood = []
    for _ in range(Limits().threads + 40):
        s = connect(master.port)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        flood.append(s)
    try:
        time.sleep(1.0)
        r = requests.post(master.url + "/v1/chat/completions", json=MSG, timeout=60)
        assert r.status_code == 200, r.text
        assert threads_of(pid) <= before + 8, (before, threads_of(pid))
        deadline = Limits().header_timeout_s + 10
        for s in flood:
            s.settimeout(deadline)
            try:
                assert s.recv(1) == b"", "a slow request got an answer"
            except ConnectionResetError:
                pass  # closed too
    finally:
        for s in flood:
            s.close()
    assert requests.get(master.url + "/healthz", timeout=10).status_code == 200
