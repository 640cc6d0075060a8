"""Fixtures for the registry tests: a real redis-server per test on a free port, and helper
processes (a worker that registers, a shard server) started with the venv's Python."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


from procs import free_port  # noqa: E402,F401 - one port picker for every test (hub + data port)


class RedisServer:
    """redis-server --port P --save "" in the foreground, stoppable and restartable on the same port."""

    def __init__(self, workdir: Path, password: str | None = None):
        self.port = free_port()
        self.password = password
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def start(self) -> "RedisServer":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_factory(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server")
    servers: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path, password).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def redis_server(redis_factory) -> RedisServer:
    return redis_factory()


class Proc:
    """A helper script in its own process; its stdout lines are read with `expect`."""

    def __init__(self, script: str, *args: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []

    def expect(self, prefix: str, timeout: float = 60.0) -> str:
        """The first stdout line starting with `prefix` (waits for it)."""
        import selectors

        for line in self.lines:
            if line.startswith(prefix):
                return line
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = self.p.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line.rstrip("\n")
        raise AssertionError(f"{prefix!r} not seen; stdout {self.lines}; stderr:\n{self.stderr_tail()}")

    def stderr_tail(self) -> str:
        if self.p.poll() is None:
            return "(still running)"
        return self.p.stderr.read()[-4000:]

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.p.wait(timeout=timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(timeout=10)


@pytest.fixture
def spawn():
    procs: list[Proc] = []

    def start(script: str, *args: str) -> Proc:
        p = Proc(script, *args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
