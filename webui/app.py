"""The chat web UI's Flask app: the page, and a thin relay to the master's HTTP API.

The browser only ever talks to this app (same origin, no API key in the page):
  GET  /              the chat page (templates/index.html, static/*: no CDN)
  POST /api/chat      {messages, temperature, max_tokens, ...} -> the master's
                      /v1/chat/completions with stream=true, relayed as server-sent events
  GET  /api/cluster   the master's /api/cluster
  GET  /healthz       this app, and whether the master answers
"""
from __future__ import annotations

import json
import select
import socket
from typing import Callable

from tpi_webui.relay import Master, MasterError

# What the page may set; everything else in its request is dropped.
CHAT_FIELDS = ("messages", "temperature", "max_tokens", "top_p", "top_k", "seed", "stop")


def browser_closed(environ) -> Callable[[], bool]:
    """A check that the browser has closed its connection (EOF or error on the socket)."""
    sock = environ.get("werkzeug.socket")

    def closed() -> bool:
        if sock is None:
            return False
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    return closed


def create_app(master: Master):
    from flask import Flask, Response, jsonify, render_template, request

    app = Flask("tpi_webui")

    def relay_error(e: MasterError):
        resp = jsonify({"error": {"message": str(e), "type": "relay_error", "param": None,
                                  "code": "master_unreachable"}})
        resp.status_code = 502
        return resp

    @app.get("/")
    def index():
        return render_template("index.html", master=master.url)

    @app.post("/api/chat")
    def chat():
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            resp = jsonify({"error": {"message": "send a JSON object with 'messages'",
                                      "type": "invalid_request_error", "param": None, "code": "invalid_json"}})
            resp.status_code = 400
            return resp
        payload = {k: body[k] for k in CHAT_FIELDS if k in body}
        payload.update(stream=True, stream_options={"include_usage": True})
        try:
            status, ctype, chunks = master.stream("/v1/chat/completions", payload,
                                                  browser_closed(request.environ))
        except MasterError as e:
            return relay_error(e)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(chunks, status=status, content_type=ctype, headers=headers)

    @app.get("/api/cluster")
    def cluster():
        try:
            status, data = master.get("/api/cluster")
        except MasterError as e:
            return relay_error(e)
        return Response(data, status=status, content_type="application/json")

    @app.get("/healthz")
    def healthz():
        try:
            status, data = master.get("/healthz")
            upstream = json.loads(data) if status == 200 else {"status": f"HTTP {status}"}
        except (MasterError, ValueError) as e:
            upstream = {"status": f"unreachable: {e}"}
        return jsonify({"status": "ok", "master": master.url, "master_health": upstream})

    return app
