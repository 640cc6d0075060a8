"""A real HTTP server process for the shard-delivery tests: the library's blueprint on
werkzeug's threaded server, plus test-only faults.

  --drop-after N   cut the connection after N body bytes of the first response for each file
  --log FILE       one line per request: "<path> <Range header or -> <status>"
Prints "port <P>" once listening.
"""
from __future__ import annotations

import argparse
import sys
import threading

from flask import Flask
from werkzeug.serving import make_server

from tpi_master.shard_server import shard_blueprint, stores_under


class DropFirst:
    """WSGI middleware: the first response for each file path stops after `limit` bytes."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.seen, self.lock = app, limit, set(), threading.Lock()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        with self.lock:
            first = "/files/" in path and path not in self.seen
            self.seen.add(path)
        body = self.app(environ, start_response)
        if not first:
            return body
        return self._cut(body)

    def _cut(self, body):
        sent = 0
        try:
            for chunk in body:
                if sent + len(chunk) > self.limit:
                    yield chunk[: self.limit - sent]
                    raise ConnectionAbortedError("test fault: connection dropped")
                sent += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()


class Log:
    def __init__(self, app, path: str):
        self.app, self.path, self.lock = app, path, threading.Lock()

    def __call__(self, environ, start_response):
        def start(status, headers, exc_info=None):
            with self.lock, open(self.path, "a") as f:
                f.write(f"{environ.get('PATH_INFO')} {environ.get('HTTP_RANGE', '-')} {status.split()[0]}\n")
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--drop-after", type=int, default=0)
    p.add_argument("--log", default=None)
    args = p.parse_args()
    app = Flask("shard-test-server")
    app.register_blueprint(shard_blueprint(stores_under(args.root), args.token))
    wsgi = app.wsgi_app
    if args.drop_after:
        wsgi = DropFirst(wsgi, args.drop_after)
    if args.log:
        wsgi = Log(wsgi, args.log)
    app.wsgi_app = wsgi
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"port {server.server_port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
