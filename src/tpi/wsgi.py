"""The one HTTP server of the master's API and the web UI: waitress, with bounded resources.

Why waitress (and not gunicorn): both services keep state in their own process (the master's
model and scheduler thread, the UI's relay), so the server must run inside that process;
gunicorn forks worker processes and its threaded worker has no deadline for a request's
headers. Waitress is pure Python, threaded, streams each write at once (server-sent events),
and reads a request's headers and body on its I/O loop, so a slow or oversized request
holds no request thread:
 * `Limits.threads` request threads (a streaming reply holds one while it lasts; further
   complete requests wait in waitress's task queue);
 * `Limits.connections` open connections, past which accepting pauses;
 * `Limits.header_timeout_s`: a request whose headers and body have not all arrived this
   long after its first byte is dropped (slow-header floods), on top of waitress's idle
   timeout `Limits.idle_timeout_s` for connections with nothing running;
 * bodies above `Limits.max_body_bytes` and headers above `Limits.max_header_bytes` are
   refused (413 / 431) before the application parses anything.

`parse_json(body)` reads a request body as JSON the same way for both services, and
`client_closed(environ)` is the one way a request handler learns that its client has gone
(waitress keeps reading a connection while its request runs, `channel_request_lookahead`).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Limits:
    threads: int = 64
    connections: int = 512
    header_timeout_s: float = 10.0
    idle_timeout_s: int = 60
    max_body_bytes: int = 4 << 20
    max_header_bytes: int = 64 << 10


def parse_json(data: bytes):
    """A request body as JSON; ValueError naming the cause for anything else: not JSON,
    NaN/Infinity (not JSON either), nesting too deep for the parser."""
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def client_closed(environ) -> Callable[[], bool]:
    """A check that the request's client has closed its connection."""
    check = environ.get("waitress.client_disconnected")
    return check if check is not None else (lambda: False)


def make_server(app, host: str, port: int, limits: Limits = Limits()) -> "Server":
    """A server bound to (host, port) now (port 0 picks one: `.port`); serve with
    `serve_forever()`, stop from any thread with `shutdown()`."""
    from waitress.adjustments import Adjustments
    from waitress.channel import HTTPChannel
    from waitress.server import TcpWSGIServer
    from waitress.task import ThreadedTaskDispatcher

    class Channel(HTTPChannel):
        """Notes when the request being read began (its first byte)."""
        request_started = 0.0

        def received(self, data):
            if self.request is None and data:
                self.request_started = time.monotonic()
            return super().received(data)

    class Waitress(TcpWSGIServer):
        channel_class = Channel

        def maintenance(self, now):
            super().maintenance(now)  # idle connections
            cutoff = time.monotonic() - limits.header_timeout_s
            for channel in list(self.active_channels.values()):
                if channel.request is not None and not channel.requests and channel.request_started < cutoff:
                    channel.will_close = True  # headers/body still incomplete: a slow client

    adj = Adjustments(host=host, port=port, threads=limits.threads, connection_limit=limits.connections,
                      channel_timeout=limits.idle_timeout_s, cleanup_interval=1,
                      max_request_body_size=limits.max_body_bytes,
                      max_request_header_size=limits.max_header_bytes,
                      channel_request_lookahead=1, ident="tpi", expose_tracebacks=False)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    sockets: dict = {}  # waitress's asyncore map: the listener, its wake-up pipe, every connection
    waitress = Waitress(app, map=sockets, dispatcher=dispatcher, adj=adj, sockinfo=adj.listen[0])
    return Server(waitress, sockets, dispatcher)


class Server:
    def __init__(self, waitress, sockets: dict, dispatcher):
        self.waitress, self.sockets, self.dispatcher = waitress, sockets, dispatcher
        self.port = int(waitress.effective_port)   # waitress reports it as a string
        self.stopping = threading.Event()

    def serve_forever(self) -> None:
        from waitress import wasyncore

        try:
            while not self.stopping.is_set():
                wasyncore.loop(timeout=1.0, map=self.sockets, use_poll=True, count=1)
        finally:
            self.dispatcher.shutdown(cancel_pending=True, timeout=5)
            wasyncore.close_all(self.sockets)

    def shutdown(self) -> None:
        self.stopping.set()
        try:
            self.waitress.pull_trigger()
        except OSError:
            pass

