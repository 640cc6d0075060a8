"""The web UI's client of the master's HTTP API (standard library only).

`stream()` passes the master's server-sent events through as they arrive. A reader thread
pulls from the master while the response generator waits on a queue, so the generator can
also watch the browser's socket: when the browser goes away (the stop button aborts the
fetch), the upstream connection is shut down and the master cancels the generation.
"""
from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
from typing import Callable, Iterator
from urllib.parse import urlsplit

POLL_S = 0.2


class MasterError(Exception):
    """The master could not be reached."""


class Master:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 10.0):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--master must be an http(s) URL like http://HOST:8000; got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.scheme, self.host, self.base = parts.scheme, parts.hostname, parts.path.rstrip("/")
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.api_key, self.timeout_s = api_key, timeout_s

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _headers(self, body: bytes | None) -> dict:
        h = {"Accept": "application/json, text/event-stream"}
        if body is not None:
            h["Content-Type"] = "application/json"
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def get(self, path: str) -> tuple[int, bytes]:
        """GET a JSON endpoint: (status, body bytes)."""
        conn = self._connect(self.timeout_s)
        try:
            conn.request("GET", self.base + path, headers=self._headers(None))
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise MasterError(f"cannot reach the master at {self.url}: {e}") from e
        finally:
            conn.close()

    def generation_defaults(self) -> dict:
        """The served model's sampling defaults (its card in /v1/models), or {} if unknown."""
        try:
            status, data = self.get("/v1/models")
            card = json.loads(data)["data"][0] if status == 200 else {}
            defaults = card.get("generation_defaults")
            return defaults if isinstance(defaults, dict) else {}
        except (MasterError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return {}

    def stream(self, path: str, payload: dict, browser_closed: Callable[[], bool]
               ) -> tuple[int, str, Iterator[bytes]]:
        """POST and relay the response: (status, content type, body chunks as they come)."""
        body = json.dumps(payload).encode()
        conn = self._connect(self.timeout_s)
        try:
            conn.request("POST", self.base + path, body=body, headers=self._headers(body))
            sock = conn.sock  # getresponse() hands the socket to the response and forgets it
            sock.settimeout(None)  # a queued or slow generation may be silent for a while
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise MasterError(f"cannot reach the master at {self.url}: {e}") from e
        ctype = resp.getheader("Content-Type", "application/json")
        if resp.status != 200 or not ctype.startswith("text/event-stream"):
            try:
                data = resp.read()
            finally:
                conn.close()
            return resp.status, ctype, iter([data])
        return resp.status, ctype, _relay(sock, resp, browser_closed)


def _relay(sock: socket.socket, resp: http.client.HTTPResponse,
           browser_closed: Callable[[], bool]) -> Iterator[bytes]:
    chunks: queue.Queue = queue.Queue()

    def pump() -> None:
        try:
            while True:
                data = resp.read1(65536)
                if not data:
                    break
                chunks.put(data)
        except Exception as e:  # connection reset, or shut down by the generator below
            chunks.put(e)
        finally:
            chunks.put(None)

    threading.Thread(target=pump, name="relay", daemon=True).start()
    finished = False
    try:
        while True:
            try:
                item = chunks.get(timeout=POLL_S)
            except queue.Empty:
                if browser_closed():
                    return
                continue
            if item is None:
                finished = True
                return
            if isinstance(item, Exception):
                finished = True
                err = {"error": {"message": f"lost the master mid-reply: {item}", "type": "relay_error",
                                 "param": None, "code": "upstream_closed"}}
                yield ("data: " + json.dumps(err) + "\n\n").encode()
                return
            yield item
    finally:
        if not finished:  # the browser left: close upstream so the master cancels
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        resp.close()
