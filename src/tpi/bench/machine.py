"""Facts about the machine a figure was measured on. The machine is shared: the load average
at the time of each run is part of the figure."""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def snapshot() -> dict:
    """nproc, CPU model, memory, load averages, time: recorded with every run."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_bytes": mem_total_bytes(),
        "loadavg": list(os.getloadavg()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command_line() -> str:
    """The command that is running, as a user would type it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("/tpi", "tpi_cli/main.py", "cli/__main__.py", "cli/main.py")):
        argv[0] = "tpi"
    return " ".join(shlex.quote(a) for a in argv)
