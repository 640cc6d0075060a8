"""Soak: a master with 3 workers (`tpi master --listen ... --devices 4` and three `tpi worker`,
default flags but an API key) under, for --minutes (default 5):
  * --clients (32) streaming chat clients in a loop, each reply checked against the greedy
    text the same prompt gave alone before the soak;
  * a slow-header flood: --slow (200) HTTP connections that send half a request line and
    a header byte now and then, reopened when the server drops them;
  * a pre-authentication flood: --preauth (64) connections to the hub that open a WebSocket
    upgrade and then send junk or nothing, reopened when dropped; plus requests without the
    API key (401s).
Every second it samples the master's RSS and thread count (/proc). At the end it prints a
Markdown block (figures, load average) for docs/benchmarks.md. Not a test.

  python bench/soak.py [--minutes 5] [--clients 32]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

PROMPTS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS bytes, threads) of a process."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


class Soak:
    def __init__(self, args):
        self.args, self.stop = args, threading.Event()
        self.key, self.token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.http, self.hub = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.lock = threading.Lock()
        self.counts = {"replies": 0, "wrong": 0, "errors": 0, "unauthorized": 0, "slow_opened": 0,
                       "slow_dropped": 0, "preauth_opened": 0, "preauth_dropped": 0}
        self.errors: list[str] = []
        self.samples: list[tuple[float, int, int]] = []
        self.procs: list[subprocess.Popen] = []

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def start(self) -> None:
        env = dict(os.environ, TPI_API_KEY=self.key, TPI_JOIN_TOKEN=self.token)
        master = [sys.executable, "-m", "tpi_cli", "master", "--http", f"127.0.0.1:{self.http}",
                  "--listen", f"127.0.0.1:{self.hub}", "--devices", "4"]
        self.master = subprocess.Popen(master, env=env, stdout=subprocess.DEVNULL, stderr=open("/tmp/soak-master.log", "wb"))
        self.procs.append(self.master)
        for i in range(3):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "tpi_cli", "worker", "--master", f"ws://127.0.0.1:{self.hub}", "--name", f"soak-{i}"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(f"/tmp/soak-worker-{i}.log", "wb")))
        for _ in range(900):
            if self.master.poll() is not None:
                raise SystemExit(f"the master exited with {self.master.returncode}: /tmp/soak-master.log")
            try:
                if requests.get(self.url + "/healthz", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise SystemExit("the master did not become ready")

    def chat(self, prompt: str) -> str:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": self.args.tokens,
                "temperature": 0, "stream": True}
        r = requests.post(self.url + "/v1/chat/completions", json=body, stream=True, timeout=600,
                          headers={"Authorization": f"Bearer {self.key}"})
        r.raise_for_status()
        text, done = "", False
        for line in r.iter_lines():
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                text += event["choices"][0]["delta"].get("content") or ""
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        return text

    def client(self, i: int, expected: dict) -> None:
        n = i
        while not self.stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            try:
                got = self.chat(prompt)
                self.count("replies")
                if got != expected[prompt]:
                    self.count("wrong")
                    self.errors.append(f"{prompt!r}: {got!r} != {expected[prompt]!r}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                self.count("errors")
                self.errors.append(f"{prompt!r}: {type(e).__name__}: {e}")

    def slow_headers(self) -> None:
        """Half a request, a header byte every 2 s; reopened when the server drops it."""
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.http), timeout=5) as s:
                    self.count("slow_opened")
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                    while not self.stop.wait(2.0):
                        s.sendall(b"X")
            except OSError:
                self.count("slow_dropped")
                self.stop.wait(0.2)

    def preauth(self, i: int) -> None:
        """A WebSocket upgrade to the hub, then junk (or silence), never the join proof."""
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.hub), timeout=5) as s:
                    self.count("preauth_opened")
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
                    junk = os.urandom(1 << 16) if i % 2 else b""
                    while not self.stop.wait(1.0):
                        if junk:
                            s.sendall(junk)
                        elif not s.recv(65536):
                            break
            except OSError:
                pass
            self.count("preauth_dropped")
            self.stop.wait(0.2)
            try:
                r = requests.get(self.url + "/v1/models", timeout=10)
                if r.status_code == 401:
                    self.count("unauthorized")
            except requests.RequestException:
                pass

    def sample(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(1.0):
            try:
                rss, threads = proc_status(self.master.pid)
                self.samples.append((time.monotonic() - t0, rss, threads))
            except OSError:
                return

    def run(self) -> dict:
        a = self.args
        expected = {p: self.chat(p) for p in PROMPTS}  # alone, before any load
        rss0, threads0 = proc_status(self.master.pid)
        load0 = os.getloadavg()
        workers = ([threading.Thread(target=self.client, args=(i, expected)) for i in range(a.clients)]
                   + [threading.Thread(target=self.slow_headers) for _ in range(a.slow)]
                   + [threading.Thread(target=self.preauth, args=(i,)) for i in range(a.preauth)]
                   + [threading.Thread(target=self.sample)])
        for t in workers:
            t.daemon = True
            t.start()
        time.sleep(a.minutes * 60)
        self.stop.set()
        for t in workers:
            t.join(timeout=700)
        rss = [s[1] for s in self.samples]
        threads = [s[2] for s in self.samples]
        return {"minutes": a.minutes, "clients": a.clients, "slow": a.slow, "preauth": a.preauth,
                "tokens": a.tokens, "counts": self.counts, "errors": self.errors[:10],
                "master_rss_mb": {"before": rss0 / 1e6, "max": max(rss) / 1e6, "last": rss[-1] / 1e6},
                "master_threads": {"before": threads0, "max": max(threads), "last": threads[-1]},
                "loadavg_before": load0, "loadavg_after": os.getloadavg(), "expected": expected}

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--slow", type=int, default=200)
    p.add_argument("--preauth", type=int, default=64)
    p.add_argument("--tokens", type=int, default=12)
    args = p.parse_args()
    soak = Soak(args)
    try:
        soak.start()
        result = soak.run()
    finally:
        soak.close()
    print(json.dumps(result, indent=1))
    c = result["counts"]
    print(f"\n| {args.minutes:g} min, {args.clients} streaming clients, {args.slow} slow-header, {args.preauth} "
          f"pre-auth | replies {c['replies']} (wrong {c['wrong']}, errors {c['errors']}) | master RSS "
          f"{result['master_rss_mb']['before']:.0f} -> max {result['master_rss_mb']['max']:.0f} MB | threads "
          f"{result['master_threads']['before']} -> max {result['master_threads']['max']} | load "
          f"{result['loadavg_before'][0]:.1f} -> {result['loadavg_after'][0]:.1f} |")
    return 0 if c["wrong"] == 0 and c["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
