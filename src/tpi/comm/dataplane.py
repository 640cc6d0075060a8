"""The data plane: one plain TCP connection per worker that carries the star all-reduce.

The engine thread sends and receives its collective frames itself, with blocking socket
calls: no event loop, no thread hand-off per collective (the control connection, a
WebSocket, stays on the endpoint's event loop). Each message is

    u32 length | frame (protocol.py) | 16-byte tag (session.py)

read into a preallocated buffer and checked before use. The worker opens the connection
right after its join handshake and proves it holds that handshake's session:

    worker -> hub:  b"TPID" | u32 rank | tag over both      (tag #0 of "data connect->accept")
    hub -> worker:  tag over b"TPID-ok"                      (tag #0 of "data accept->connect")

Before that proof the hub reads exactly 24 bytes, within the handshake timeout, from at
most MAX_HANDSHAKES connections at once. With TLS on the hub (wss://) this connection is
TLS too.
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

from tpi.comm.auth import verify
from tpi.comm.base import CommError
from tpi.comm.link import Link, Pacer
from tpi.comm.session import TAG_BYTES, Session
from tpi.protocol import ProtocolError

log = logging.getLogger("tpi.comm")
MAGIC = b"TPID"
MAX_HANDSHAKES = 8
WAKE_S = 0.1  # a blocked receive wakes this often to check its deadline
BACKGROUND_BYTES = 64 << 10  # frames this big are sent by the pacer thread (send())
SOCKET_BUFFER = 4 << 20  # kernel buffers per direction (capped by net.core.[rw]mem_max)
_LEN = struct.Struct("<I")
_HELLO = struct.Struct("<4sI")
_OK = b"TPID-ok"


class TimedOut(CommError):
    """The peer sent nothing in time (it may only be slow)."""


class DataSocket:
    """One side of a data connection. `send` and `recv` belong to one thread each (the
    engine's); `shutdown` may come from any thread and wakes a blocked `recv`.

    Receiving reads whatever the kernel has into one buffer (usually a whole frame per
    system call) and hands out views into it. Each socket call waits at most WAKE_S (a
    kernel timeout set once, not a poll per call); the caller's deadline is checked
    between calls."""

    def __init__(self, sock: socket.socket, session: Session, max_bytes: int,
                 timeout: float, link: Link | None = None):
        """timeout: how long a send may make no progress before the peer counts as lost."""
        self.sock, self.session, self.max_bytes = sock, session, max_bytes
        self.timeout = timeout
        self._link, self._pacer = link, Pacer.shared()
        self._lock = threading.Lock()
        self._queued = 0                              # frames handed to the pacer, unsent
        self._buf = bytearray(64 << 10)               # grows to the largest frame seen
        self._view = memoryview(self._buf)
        self._start = self._end = 0                   # unread bytes: _buf[_start:_end]
        self.lost: str | None = None
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(WAKE_S)
        else:
            sock.settimeout(None)                     # blocking, with kernel timeouts
            tv = struct.pack("ll", 0, int(WAKE_S * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):   # a prefill's frame in one go, so
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)  # the sender moves on

    def send(self, *chunks) -> None:
        """Send one frame given as byte chunks (header, payload): no join, no copy. A frame
        of BACKGROUND_BYTES or more (a prefill's) is copied and left to the pacer thread, so
        the master's compute overlaps its sends; so is every frame under link emulation."""
        n = sum(len(c) for c in chunks)
        tag = self.session.out.tag(*chunks)
        parts = [_LEN.pack(n + TAG_BYTES), *chunks, tag]
        with self._lock:
            direct = self._link is None and n < BACKGROUND_BYTES and not self._queued
            if not direct:
                self._queued += 1
        if direct:
            self.write_now(parts)
            return
        at = self._link.schedule(n + 4 + TAG_BYTES, time.monotonic()) if self._link else 0.0
        self._pacer.send_at(at, self, b"".join(parts))

    def sent(self) -> None:
        """The pacer wrote one queued frame; later frames may go direct again."""
        with self._lock:
            self._queued -= 1

    def write_now(self, parts: list) -> None:
        """Write one framed message now (send() or the link pacer calls this)."""
        tls = isinstance(self.sock, ssl.SSLSocket)    # no sendmsg on TLS sockets
        total, sent, rest = sum(len(p) for p in parts), 0, None
        deadline = time.monotonic() + self.timeout
        while sent < total:
            try:
                if rest is None and not tls:
                    sent = self.sock.sendmsg(parts)   # usually all of it, one system call
                else:
                    rest = rest or memoryview(b"".join(parts))
                    sent += self.sock.send(rest[sent:])
                rest = rest or (memoryview(b"".join(parts)) if sent < total else None)
            except (socket.timeout, TimeoutError, BlockingIOError):
                rest = rest or memoryview(b"".join(parts))
                if time.monotonic() >= deadline:
                    raise self._lose(f"send made no progress for {self.timeout:g}s") from None
            except OSError as e:
                raise self._lose(f"send failed: {e}") from None

    def recv(self, deadline: float) -> memoryview:
        """The next frame (a view into this socket's buffer, valid until this socket reads
        again). CommError on timeout or a closed connection, ProtocolError on a bad length
        or tag."""
        while not self.ready():
            if time.monotonic() >= deadline:
                raise TimedOut("timed out")
            self.read(wait=True)
        return self.take()

    def ready(self) -> bool:
        """A whole frame is buffered."""
        return self._end - self._start >= self._wanted()

    def take(self) -> memoryview:
        """The buffered frame (after `ready()`), its tag checked."""
        first = self._start + 4
        self._start = first + self._wanted() - 4
        return self.session.open(self._view[first:self._start])

    def _wanted(self) -> int:
        """Unread bytes the next whole frame needs (4 while its length is unknown)."""
        if self._end - self._start < 4:
            return 4
        (n,) = _LEN.unpack_from(self._buf, self._start)
        if not TAG_BYTES <= n <= self.max_bytes + TAG_BYTES:
            raise ProtocolError(f"data frame of {n} bytes outside 16..{self.max_bytes + 16}")
        return 4 + n

    def read(self, wait: bool) -> None:
        """One read of whatever the kernel has; `wait`: block up to WAKE_S for it (a TLS
        socket always may)."""
        if self.lost is not None:
            raise CommError(self.lost)
        if self._start == self._end:
            self._start = self._end = 0
        k = self._wanted()
        if self._start + k > len(self._buf):          # make room: move the unread bytes
            left = self._end - self._start
            if k > len(self._buf):
                buf = bytearray(k)
                buf[:left] = self._view[self._start:self._end]
                self._buf, self._view = buf, memoryview(buf)
            else:
                self._buf[:left] = self._view[self._start:self._end]
            self._start, self._end = 0, left
        flags = 0 if wait or isinstance(self.sock, ssl.SSLSocket) else socket.MSG_DONTWAIT
        try:
            got = self.sock.recv_into(self._view[self._end:], 0, flags)
        except (socket.timeout, TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError as e:
            raise self._lose(f"connection error: {e}") from None
        if not got:
            raise self._lose(self.lost or "connection closed")
        self._end += got

    def fileno(self) -> int:
        return self.sock.fileno()

    def _lose(self, reason: str) -> CommError:
        self.lost = self.lost or reason
        return CommError(self.lost)

    def shutdown(self, reason: str = "closed") -> None:
        """Close the connection; a blocked recv returns at once."""
        self.lost = self.lost or reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ProtocolError("closed during the data handshake")
        out += got
    return out


def connect(host: str, port: int, rank: int, session_key: bytes, timeout: float,
            max_bytes: int, ssl_context=None, link: Link | None = None,
            io_timeout: float = 60.0) -> DataSocket:
    """Worker side: open and prove the data connection of a joined worker (within
    `timeout`; `io_timeout`: how long a send may stall, DataSocket)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        session = Session(session_key, accepting=False, channel=b"data")
        hello = _HELLO.pack(MAGIC, rank)
        sock.sendall(hello + session.out.tag(hello))
        if not verify(session.inp.tag(_OK), _read_exact(sock, TAG_BYTES)):
            raise CommError("the hub's data port did not prove the session")
    except (OSError, ProtocolError) as e:
        raise CommError(f"cannot open the data connection to {host}:{port}: {e}") from e
    return DataSocket(sock, session, max_bytes, io_timeout, link)


class DataListener:
    """Hub side: accepts data connections, checks each against the session of the rank it
    claims (`session_of(rank)` -> key or None) and hands it to `attach(rank, DataSocket)`."""

    def __init__(self, host: str, port: int, session_of: Callable[[int], bytes | None],
                 attach: Callable[[int, DataSocket], None], timeout: float, max_bytes: int,
                 ssl_context=None, link: Link | None = None, io_timeout: float = 60.0):
        self._session_of, self._attach = session_of, attach
        self._timeout, self._max_bytes, self._ssl, self._link = timeout, max_bytes, \
            ssl_context, link
        self._io_timeout = io_timeout
        self._slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._sock = socket.create_server((host, port), family=_family(host), backlog=64)
        self.port: int = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="tpi-data-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, addr = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                log.warning("data port: refused %s: %d handshakes already in progress",
                            addr[0], MAX_HANDSHAKES)
                sock.close()
                continue
            threading.Thread(target=self._handshake, args=(sock, addr), daemon=True,
                             name="tpi-data-handshake").start()

    def _handshake(self, sock: socket.socket, addr) -> None:
        try:
            sock.settimeout(self._timeout)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_side=True)
            raw = _read_exact(sock, _HELLO.size + TAG_BYTES)
            magic, rank = _HELLO.unpack_from(raw)
            key = self._session_of(rank) if magic == MAGIC else None
            if key is None:
                raise ProtocolError(f"not a data connection of a joined rank ({magic!r}, "
                                    f"rank {rank})")
            session = Session(key, accepting=True, channel=b"data")
            if not verify(session.inp.tag(raw[:_HELLO.size]), raw[_HELLO.size:]):
                raise ProtocolError(f"rank {rank}'s data connection failed authentication")
            sock.sendall(session.out.tag(_OK))
            self._attach(rank, DataSocket(sock, session, self._max_bytes, self._io_timeout,
                                          self._link))
        except (OSError, ProtocolError) as e:
            log.warning("data port: refused %s: %s", addr[0], e)
            sock.close()
        finally:
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
