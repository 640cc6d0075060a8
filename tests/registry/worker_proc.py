"""A worker process for the registry tests: registers, heartbeats, and reports on stdout.

  registered              its record was written
  rejected: <reason>      the master refused it (exits with status 3)
SIGTERM exits cleanly (status 0), deregistering on the way out.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from tpi.cluster.capability import DeviceCapability
from tpi.cluster.registry import register_worker


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--cluster", default="default")
    p.add_argument("--address", default="127.0.0.1:29600")
    p.add_argument("--gflops", type=float, default=10.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    cap = DeviceCapability("x86_64", 2, 8 << 30, 4 << 30, args.gflops, 500.0)
    done = threading.Event()

    def rejected(reason: str) -> None:
        print(f"rejected: {reason}", flush=True)
        done.set()

    reg = register_worker(args.url, args.token, args.id, args.address, cap, cluster=args.cluster,
                          on_rejected=rejected)
    try:
        while not done.is_set():
            if reg.wait_registered(0.2):
                print("registered", flush=True)
                break
        done.wait()
        return 3
    finally:
        reg.stop()


if __name__ == "__main__":
    sys.exit(main())
