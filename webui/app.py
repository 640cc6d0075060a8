"""The chat web UI's Flask app: the page, and a thin relay to the master's HTTP API.

The browser only ever talks to this app (same origin, no API key in the page):
  GET  /              the chat page (templates/index.html, static/*: no CDN)
  POST /api/chat      {messages, temperature, max_tokens, ...} -> the master's
                      /v1/chat/completions with stream=true, relayed as server-sent events
  GET  /api/cluster   the cluster panel's view of the master's /api/cluster (panel.py)
  GET  /healthz       this app, and whether the master answers

The app holds the master's API key, so it guards what it lends that key for:
 * POST /api/chat takes only `Content-Type: application/json` from this app's own origin
   (a cross-site page can send a `text/plain` POST without a CORS preflight; its Origin,
   or Sec-Fetch-Site, names the other site);
 * /api/cluster relays only the fields the panel shows (no addresses, no plan), since the
   master keeps its full status behind the key;
 * every response carries a Content-Security-Policy that allows this origin's scripts,
   styles and fetches only.
"""
from __future__ import annotations

import json

from tpi.wsgi import client_closed, parse_json
from tpi_webui.panel import panel_view
from tpi_webui.relay import Master, MasterError

# What the page may set; everything else in its request is dropped.
CHAT_FIELDS = ("messages", "temperature", "max_tokens", "top_p", "top_k", "seed", "stop")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def error(status: int, message: str, code: str):
    from flask import jsonify

    resp = jsonify({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    resp.status_code = status
    return resp


def foreign_request(request) -> str | None:
    """Why a POST did not come from this app's own page, or None. Browsers send Origin on
    every cross-origin POST and Sec-Fetch-Site on every request they make."""
    site = request.headers.get("Sec-Fetch-Site")
    if site not in (None, "same-origin", "none"):
        return f"Sec-Fetch-Site is {site!r}"
    origin = request.headers.get("Origin")
    if origin is not None and origin != request.host_url.rstrip("/"):
        return f"Origin {origin!r} is not this app ({request.host_url.rstrip('/')})"
    return None


def create_app(master: Master):
    from flask import Flask, Response, jsonify, render_template, request

    app = Flask("tpi_webui")

    @app.after_request
    def secure(resp):
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def relay_error(e: MasterError):
        resp = jsonify({"error": {"message": str(e), "type": "relay_error", "param": None,
                                  "code": "master_unreachable"}})
        resp.status_code = 502
        return resp

    @app.get("/")
    def index():
        defaults = master.generation_defaults()
        return render_template("index.html", master=master.url, temperature=defaults.get("temperature", 0),
                               defaults_source="the model's default: " + defaults.get("source", "unknown"))

    @app.post("/api/chat")
    def chat():
        why = foreign_request(request)
        if why:
            return error(403, f"cross-site request refused: {why}", "cross_site")
        if request.mimetype != "application/json":
            return error(415, "send the chat as Content-Type: application/json", "unsupported_media_type")
        try:
            body = parse_json(request.get_data())
        except ValueError as e:
            return error(400, f"the request body is not valid JSON: {e}", "invalid_json")
        if not isinstance(body, dict):
            return error(400, "send a JSON object with 'messages'", "invalid_json")
        payload = {k: body[k] for k in CHAT_FIELDS if k in body}
        payload.update(stream=True, stream_options={"include_usage": True})
        try:
            status, ctype, chunks = master.stream("/v1/chat/completions", payload,
                                                  client_closed(request.environ))
        except MasterError as e:
            return relay_error(e)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(chunks, status=status, content_type=ctype, headers=headers)

    @app.get("/api/cluster")
    def cluster():
        try:
            status, data = master.get("/api/cluster")
            view = panel_view(json.loads(data)) if status == 200 else json.loads(data)
        except MasterError as e:
            return relay_error(e)
        except ValueError:
            return relay_error(MasterError(f"the master's /api/cluster answered HTTP {status} without JSON"))
        return jsonify(view), status

    @app.get("/healthz")
    def healthz():
        try:
            status, data = master.get("/healthz")
            upstream = json.loads(data) if status == 200 else {"status": f"HTTP {status}"}
        except (MasterError, ValueError) as e:
            upstream = {"status": f"unreachable: {e}"}
        return jsonify({"status": "ok", "master": master.url, "master_health": upstream})

    return app
