"""A real `tpi worker` (the CLI's own code) that also writes down every frame it receives.

Run as `python spy_worker.py LOG worker-args...`. The two places a worker receives bytes
from the master are wrapped, nothing else changes: the control connection's `Conn.recv`
(every frame after the join handshake) and the data plane's `DataSocket.take` (every
collective frame, its tag checked). Each record in LOG is one byte for the channel (C or
D), a u32 length and the frame exactly as the worker got it (tests/cluster/test_privacy.py
decodes them)."""
from __future__ import annotations

import struct
import sys
import threading

from tpi.comm.conn import Conn
from tpi.comm.dataplane import DataSocket


def spy(log_path: str) -> None:
    out = open(log_path, "ab", buffering=0)
    lock = threading.Lock()

    def record(channel: bytes, frame) -> None:
        data = bytes(frame)
        with lock:
            out.write(channel + struct.pack("<I", len(data)) + data)

    conn_recv, take = Conn.recv, DataSocket.take

    async def recv(self):
        frame = await conn_recv(self)
        record(b"C", frame)
        return frame

    def take_and_record(self):
        frame = take(self)
        record(b"D", frame)
        return frame

    Conn.recv, DataSocket.take = recv, take_and_record


def read_log(log_path: str) -> list[tuple[str, bytes]]:
    """The records of a spy's LOG: (channel "C" or "D", frame bytes)."""
    raw, out, at = open(log_path, "rb").read(), [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at + 1)
        out.append((raw[at:at + 1].decode(), raw[at + 5:at + 5 + n]))
        at += 5 + n
    return out


if __name__ == "__main__":
    spy(sys.argv[1])
    from tpi_cli.main import main

    sys.exit(main(sys.argv[2:]))
