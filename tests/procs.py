"""Real servers for the API and web UI tests: `tpi master` and `tpi webui` as subprocesses
on free ports, each logging to a file that is shown when it fails to start, and the
fixtures built on them (a test module imports the fixtures it uses; module-scoped ones
start once per module).

Fixtures live here rather than in conftest.py files: several conftest.py modules would
shadow one another under the name `conftest`, which tests/engine imports by that name."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

# The tests pin float32: greedy SmolLM2 answers the reference questions exactly as the
# Hugging Face float32 model does, and batched rows round exactly like single ones.
MASTER_ARGS = ("--devices", "2", "--dtype", "float32")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"   # screenshots (gitignored)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port p whose neighbour p + 1 is free too (a hub listening on p opens its data
    plane on p + 1), and that no earlier call of this process handed out as p or p + 1: two
    ports picked one after the other (hub, HTTP) cannot land on each other's data port."""
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if {port - 1, port, port + 1} & _HANDED_OUT or port >= 65535:
                continue
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        _HANDED_OUT.update({port, port + 1})
        return port


class Server:
    def __init__(self, name: str, args: list[str], port: int, log_dir: Path):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tpi_cli", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ))

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout_s: float = 240.0) -> "Server":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_master(log_dir: Path, *extra: str) -> Server:
    port = free_port()
    return Server("master", ["master", "--http", f"127.0.0.1:{port}", *MASTER_ARGS, *extra],
                  port, log_dir).wait_ready()


def start_templated_master(model: Path, template: Path, work: Path) -> Server:
    """A master serving a copy of `model` whose tokenizer_config.json carries `template` as
    its chat template (the tool-call tests: tests/data/templates)."""
    copy = work / "model"
    shutil.copytree(model, copy)
    cfg_path = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template.read_text()
    cfg_path.write_text(json.dumps(cfg))
    return start_master(work, "--model", str(copy))


def start_worker(port: int, token: str, log_dir: Path, name: str, *extra: str) -> subprocess.Popen:
    """A real `tpi worker` joining the master's hub on loopback `port`."""
    log = open(log_dir / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "tpi_cli", "worker", "--master", f"ws://127.0.0.1:{port}",
                             "--join-token", token, "--name", name, "--timeout", "3", *extra],
                            stdout=log, stderr=subprocess.STDOUT)


class ServedCluster:
    """`tpi master --listen` and one real `tpi worker` process per further device, all on
    loopback; the HTTP API at `.master.url`. A context manager: everything stops on exit."""

    def __init__(self, log_dir: Path, weights: list[float], *master_args: str,
                 token: str = "served-cluster-test-join-token"):
        self.hub_port, http_port = free_port(), free_port()
        self.workers = [start_worker(self.hub_port, token, log_dir, f"w{r}") for r in range(1, len(weights))]
        self.master = Server("master", [
            "master", "--http", f"127.0.0.1:{http_port}", "--listen", f"127.0.0.1:{self.hub_port}",
            "--weights", ",".join(str(w) for w in weights), "--expect-workers", str(len(weights) - 1),
            "--join-token", token, "--timeout", "10", *master_args], http_port, log_dir)

    def __enter__(self) -> "ServedCluster":
        try:
            self.master.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.master.stop()
        for w in self.workers:
            w.kill()
            w.wait()


def start_webui(log_dir: Path, master_url: str, *extra: str) -> Server:
    port = free_port()
    return Server("webui", ["webui", "--master", master_url, "--listen", f"127.0.0.1:{port}", *extra],
                  port, log_dir).wait_ready()


def wait_for(predicate, timeout_s: float = 15.0, interval_s: float = 0.1):
    """Poll until predicate() returns something truthy; returns it (or the last value)."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    return value


def metric(text: str, name: str) -> float:
    """The value of one sample (name with labels, exactly as rendered) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# ---- fixtures ----

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    """A real master: `tpi master --devices 2` serving SmolLM2."""
    server = start_master(tmp_path_factory.mktemp("master"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(master):
    """The official OpenAI client, pointed at the master."""
    from openai import OpenAI

    return OpenAI(base_url=master.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def webui(master, tmp_path_factory):
    """A real `tpi webui` relaying to the master."""
    server = start_webui(tmp_path_factory.mktemp("webui"), master.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium through Playwright."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, webui):
    """The chat page, freshly loaded; fails the test on any JavaScript error."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(webui.url + "/")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
