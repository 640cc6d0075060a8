"""The Compose appliance under test: a unique project of compose.yaml on this machine's
Docker engine with fresh secrets and free host ports (tests/e2e/test_appliance.py uses it)."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
QUESTION = "What is the capital of France?"
WORKERS = 4
LINK = {"latency_s": 0.005, "jitter_s": 0.001, "rate_bps": 300e6}
EDGE_LINK = "latency=5ms,bandwidth=300mbit,jitter=1ms"
LAYERS = 30                # SmolLM2-135M
UP_TIMEOUT_S = 900         # build-free: ~2 min converting the model, ~1 min splitting and loading
REPLY_TIMEOUT_S = 300


def docker_info_error() -> str | None:
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["docker info failed"])[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Appliance:
    """One Compose project of compose.yaml, driven like a user would (CLI) and inspected with
    the Docker SDK."""

    def __init__(self):
        import docker

        self.client = docker.from_env()
        self.project = "tpie2e" + secrets.token_hex(3)
        self.ports = {name: free_port() for name in ("webui", "api", "redis", "hub")}
        self.secrets = {"TPI_JOIN_TOKEN": secrets.token_urlsafe(24), "REDIS_PASSWORD": secrets.token_urlsafe(24),
                        "TPI_API_KEY": secrets.token_urlsafe(24)}
        self.env = {**os.environ, **self.secrets,
                    "COMPOSE_PROJECT_NAME": self.project, "TPI_PUBLISH_ADDRESS": "127.0.0.1",
                    "TPI_WEBUI_ADDRESS": "127.0.0.1", "TPI_WEBUI_PORT": str(self.ports["webui"]),
                    "TPI_API_PORT": str(self.ports["api"]), "TPI_REDIS_PORT": str(self.ports["redis"]),
                    "TPI_HUB_PORT": str(self.ports["hub"]), "TPI_WORKERS": str(WORKERS),
                    "TPI_MIN_WORKERS": str(WORKERS), "EDGE_LINK": EDGE_LINK,
                    "COMPOSE_PROFILES": "netem"}  # the link-emulation sidecar (off by default)
        for k in ("TPI_TRANSPORT_LINK", "DOCKER_DEFAULT_PLATFORM"):
            self.env.pop(k, None)
        files = ["compose.yaml"] + [f for f in os.environ.get("TPI_E2E_COMPOSE_FILES", "").split(":") if f]
        self.files = [a for f in files for a in ("-f", f)]
        self.webui = f"http://127.0.0.1:{self.ports['webui']}"
        self.api = f"http://127.0.0.1:{self.ports['api']}"
        self.figures: dict = {"project": self.project, "edge_link": EDGE_LINK, "timings_s": {}}

    # --- the CLI ---------------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["docker", "compose", "-p", self.project, *self.files, *args], cwd=REPO, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
        return r

    def containers(self, service: str | None = None, all: bool = False) -> list:
        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        found = self.client.containers.list(all=all, filters={"label": labels})
        return sorted(found, key=lambda c: c.name)

    def one(self, service: str):
        (c,) = self.containers(service)
        return c

    def exec(self, container, cmd: list[str], user: str = "") -> str:
        rc, out = container.exec_run(cmd, user=user, demux=False)
        out = out.decode(errors="replace")
        assert rc == 0, f"{container.name}: {cmd} -> exit {rc}: {out[-2000:]}"
        return out

    def health(self, container) -> str:
        container.reload()
        return container.attrs["State"].get("Health", {}).get("Status", container.status)

    # --- the web UI's backend ------------------------------------------------------------------
    def cluster(self) -> dict:
        """The master's full status (the web UI relays only its panel's fields)."""
        r = requests.get(self.api + "/api/cluster", timeout=30,
                         headers={"Authorization": f"Bearer {self.secrets['TPI_API_KEY']}"})
        r.raise_for_status()
        return r.json()

    def chat(self, content: str, max_tokens: int, on_content=None) -> dict:
        """POST /api/chat (streamed); returns text, finish reason, errors, timings."""
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
        t0 = time.monotonic()
        out = {"text": "", "finish_reason": None, "errors": [], "done": False, "chunks": 0, "ttft_s": None}
        with requests.post(self.webui + "/api/chat", json=body, stream=True, timeout=(10, REPLY_TIMEOUT_S)) as r:
            if r.status_code != 200:
                out["errors"].append(f"HTTP {r.status_code}: {r.text[:500]}")
                return out
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out["done"] = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out["errors"].append(event["error"])
                    continue
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        out["chunks"] += 1
                        out["ttft_s"] = out["ttft_s"] or time.monotonic() - t0
                        out["text"] += piece
                        if on_content is not None:
                            on_content(out)
                    out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
        out["total_s"] = time.monotonic() - t0
        return out

    # --- lifecycle -----------------------------------------------------------------------------
    def wait_until(self, what: str, check, timeout_s: float, every_s: float = 3.0):
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                last = check()
                if last:
                    return last
            except (requests.RequestException, ValueError, KeyError) as e:
                last = e
            time.sleep(every_s)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})\n"
                             + self.status_text())

    def status_text(self) -> str:
        lines = [f"{c.name}: {c.status} / {self.health(c)}" for c in self.containers(all=True)]
        return "\n".join(lines)

    def worker_devices(self, cluster: dict) -> list[dict]:
        return [d for d in cluster.get("devices", []) if d.get("role", "worker") == "worker" and d.get("rank", 1) != 0]

    def wait_ready(self, workers: int) -> dict:
        def ready():
            states = {c.name: self.health(c) for c in self.containers()}
            if any(s != "healthy" for s in states.values()):
                return None
            if len(self.containers("worker")) != workers:
                return None
            cluster = self.cluster()
            return cluster if len(self.worker_devices(cluster)) >= workers else None

        return self.wait_until(f"every service healthy and {workers} workers in /api/cluster", ready, UP_TIMEOUT_S)

    def dump_logs(self) -> None:
        out = ARTIFACTS / "e2e-logs" / f"{self.project}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        r = self.compose("logs", "--no-color", "--timestamps", check=False, timeout=120)
        out.write_text(r.stdout + r.stderr)

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False, timeout=300)
        for label in ("tpi.netem.helper", "tpi.e2e.probe"):
            for helper in self.client.containers.list(all=True, filters={"label": f"{label}={self.project}"}):
                helper.remove(force=True)

    def write_figures(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "e2e-appliance.json").write_text(json.dumps(self.figures, indent=2, default=str))
