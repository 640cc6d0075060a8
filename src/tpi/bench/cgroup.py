"""A memory limit for benchmark processes without a container: a cgroup (v1) of their own,
entered by each child before exec, its peak (page cache included) read afterwards. Needs root
and the v1 memory controller (this machine's); `available()` says whether both are there.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")
_names = itertools.count()


def available() -> bool:
    return os.geteuid() == 0 and (ROOT / "memory.limit_in_bytes").is_file()


class Cgroup:
    def __init__(self, name: str, limit: int | None):
        self.path = ROOT / f"{name}-{os.getpid()}-{next(_names)}"  # never reuse a name
        self.path.mkdir()
        if limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
        self.limit = limit

    def _enter(self) -> None:  # runs in the child before exec: the process starts inside this cgroup
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def run(self, argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run argv inside this cgroup (it enters before exec), capturing its output."""
        return subprocess.run(argv, preexec_fn=self._enter, capture_output=True, text=True, timeout=timeout, env=env)

    def spawn(self, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start argv inside this cgroup (it enters before exec), its output to `log`; do not wait."""
        with open(log, "w") as out:
            return subprocess.Popen(argv, preexec_fn=self._enter, stdout=out, stderr=subprocess.STDOUT, env=env)

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        """Kill what is left in it (only the benchmark's own process was put there), remove it."""
        for _ in range(50):
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.2)
        print(f"warning: could not remove {self.path}", file=sys.stderr)
