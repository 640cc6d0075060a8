"""`tpi generate --transport ws`: a master in this process and N-1 worker processes on
loopback, started for one generation and stopped after it."""
from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys

from tpi.protocol import Shutdown
from tpi.threads import configure_threads


class LocalCluster:
    """Context manager: a real master (hub + engine) with `devices - 1` worker subprocesses."""

    def __init__(self, args, devices: int):
        self.args, self.devices = args, devices
        self.procs: list[subprocess.Popen] = []
        self.engine = self.manager = None

    def __enter__(self):
        from tpi_master.main import build_distributed_engine

        token = secrets.token_hex(16)
        args = argparse.Namespace(**vars(self.args))
        args.join_token, args.listen = token, "127.0.0.1:0"
        args.start_timeout = 120.0
        args.allreduce = getattr(args, "allreduce", "star") or "star"
        args.wire_dtype = getattr(args, "wire_dtype", None)
        args.store = getattr(args, "store", None)
        args.timeout = getattr(args, "timeout", 10.0) or 10.0
        args.slots = 1

        threads = configure_threads(share_of_machine=self.devices)

        def spawn_workers(port: int) -> None:
            for rank in range(1, self.devices):
                cmd = [sys.executable, "-m", "tpi.cli", "worker", "--master", f"ws://127.0.0.1:{port}",
                       "--join-token", token, "--rank", str(rank), "--name", f"local-{rank}", "--once"]
                if getattr(args, "link", None):
                    cmd += ["--link", args.link]
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # share the cores
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env))

        self.engine, self.manager = build_distributed_engine(args, self.devices, on_listening=spawn_workers)
        return self.engine

    def __exit__(self, *exc):
        if self.manager is not None:
            try:
                self.manager.hub.broadcast(Shutdown(reason="generation done"))
            except Exception:  # noqa: BLE001 - workers may be gone already
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.engine is not None:
            self.engine.close()
        if self.manager is not None:
            self.manager.close()
