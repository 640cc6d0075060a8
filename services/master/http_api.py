"""The master's HTTP API: OpenAI-compatible completions (streaming as server-sent events),
the Ollama-compatible endpoints (ollama_api.py), the cluster status, health and Prometheus metrics.

Server: waitress through `tpi.wsgi` (request limits, timeouts, connection cap; why there).
 * Streaming: each yielded SSE event is written to the socket at once, so tokens reach the
   client as they are produced.
 * Concurrency: a pool of request threads. Request threads only validate, tokenize and
   wait on a queue; the model runs in the single scheduler thread, whose lock is never held
   across a forward, so /healthz, /metrics and /api/cluster answer during any generation.
 * Disconnects: `tpi.wsgi.client_closed` lets a waiting request notice a closed connection
   even before it has anything to write; a failed write also closes the response
   generator. Either way the generation is cancelled.
An asyncio server would add a dependency and buy nothing here: the concurrency is bounded
by the KV-cache slots, a handful of requests, not thousands of idle connections.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

from tpi.comm import auth
from tpi.generation.json_constraint import JsonConstraint, vocab_index
from tpi.wsgi import client_closed, make_server
from tpi_master.errors import APIError
from tpi_master.ollama_api import ollama_blueprint
from tpi_master.responses import Completion
from tpi_master.scheduler import QueueFull, Scheduler
from tpi_master.status import ClusterStatus
from tpi_master.validation import parse_body, parse_chat, parse_completion

log = logging.getLogger("tpi.master.http")

PROTECTED = ("/v1/", "/api/")   # paths that need the API key when one is configured


def create_app(engine, scheduler: Scheduler, *, model_name: str, api_key: str | None = None,
               status: ClusterStatus):
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("tpi_master")
    app.json.sort_keys = False
    metrics = scheduler.metrics
    created = int(time.time())
    tokenizer = engine.tokenizer

    def error_response(e: APIError, headers: dict | None = None):
        resp = jsonify(e.body())
        resp.status_code = e.status
        for k, v in (headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.errorhandler(APIError)
    def on_api_error(e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_response(e, headers)

    @app.errorhandler(HTTPException)
    def on_http_error(e: HTTPException):
        return error_response(APIError(e.code or 500, e.description or e.name,
                                       code=e.name.lower().replace(" ", "_")))

    @app.errorhandler(Exception)
    def on_unexpected(e: Exception):
        log.exception("unhandled error in %s", request.path)
        return error_response(APIError(500, f"internal server error: {type(e).__name__}",
                                       type="server_error", code="internal_error"))

    @app.before_request
    def check_api_key():
        if not api_key or not request.path.startswith(PROTECTED):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key. Send 'Authorization: Bearer KEY'.",
                           code="missing_api_key")
        if scheme.lower() != "bearer" or not auth.verify(api_key, token.strip()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    @app.after_request
    def count(resp):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.http_requests.inc(1, rule, str(resp.status_code))
        return resp

    def start(kind: str, spec) -> Completion:
        """Queue a checked request; its response reads the scheduler's events for this client."""
        try:
            f = spec.features
            seq = scheduler.submit(spec.prompt_ids, spec.params, spec.ignore_eos, logprobs=f.logprobs,
                                   score_prompt=f.score_prompt, speculative=spec.speculative,
                                   processor=JsonConstraint(vocab_index(tokenizer, engine.store.config.vocab_size), f.schema)
                                   if f.json_mode else None)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type="server_error",
                           code="queue_full") from None
        return Completion(kind, spec, seq, scheduler, tokenizer, model_name, client_closed(request.environ))

    app.register_blueprint(ollama_blueprint(engine, start, model_name))

    def generate(kind: str, parse):
        spec = parse(parse_body(request.get_data()), engine, model_name)
        done = start(kind, spec)
        headers = {"X-Request-Id": done.seq.id, "X-Queue-Position": str(scheduler.position(done.seq))}
        if spec.stream:
            headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return Response(done.sse(), mimetype="text/event-stream", headers=headers)
        code, obj = done.body()
        resp = jsonify(obj)
        resp.status_code = code
        resp.headers.update(headers)
        return resp

    @app.post("/v1/chat/completions")
    def chat_completions():
        return generate("chat", parse_chat)

    @app.post("/v1/completions")
    def completions():
        return generate("text", parse_completion)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tpi",
                "context_length": engine.generator.max_seq,
                "generation_defaults": engine.generation.sampling_json()}

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/<path:name>")
    def model(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return jsonify(model_card())

    @app.get("/api/cluster")
    def cluster():
        return jsonify(status.collect())

    @app.get("/healthz")
    def healthz():
        snap = scheduler.snapshot()
        ok = scheduler.alive
        resp = jsonify({"status": "ok" if ok else "scheduler stopped", "model": model_name,
                        "devices": engine.cluster.world_size, "queue_depth": snap["queue_depth"],
                        "active": len(snap["active"]), "slots": snap["slots"]})
        resp.status_code = 200 if ok else 503
        return resp

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    return app


class ApiServer:
    """The scheduler, the Flask app and a threaded HTTP server bound to (host, port);
    port 0 picks a free port (see `.port`)."""

    def __init__(self, engine, host: str, port: int, *, api_key: str | None = None,
                 model_name: str = "smollm2", status_provider: Callable[[], dict] | None = None,
                 on_cluster_failure: Callable[[], bool] | None = None, num_slots: int | None = None,
                 max_queue: int = 256, between_requests: Callable[[], None] | None = None,
                 blueprints: list | None = None):
        slots = num_slots or engine.num_slots
        self.scheduler = Scheduler(engine, slots, on_cluster_failure=on_cluster_failure, max_queue=max_queue,
                                   between_requests=between_requests)
        status = ClusterStatus(engine, self.scheduler, model_name, status_provider)
        self.app = create_app(engine, self.scheduler, model_name=model_name, api_key=api_key, status=status)
        for blueprint in blueprints or []:  # e.g. the shard server (shard_server.py)
            self.app.register_blueprint(blueprint)
        self.httpd = make_server(self.app, host, port)
        self.host, self.port = host, self.httpd.port

    def serve_forever(self) -> None:
        self.scheduler.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.scheduler.close()

    def shutdown(self) -> None:
        """Stop serving (from another thread); serve_forever returns."""
        self.httpd.shutdown()


def serve(engine, host: str, port: int, *, api_key: str | None = None, model_name: str = "smollm2",
          status_provider: Callable[[], dict] | None = None,
          on_cluster_failure: Callable[[], bool] | None = None,
          num_slots: int | None = None, max_queue: int = 256,
          between_requests: Callable[[], None] | None = None, blueprints: list | None = None,
          poke_on: Callable[[Callable[[], None]], None] | None = None) -> None:
    """Serve the API until interrupted (Ctrl-C or SIGTERM).

    status_provider: returns extra cluster status merged into GET /api/cluster (see status.py).
    on_cluster_failure: called when a forward raises CommError; True = the cluster was rebuilt
      and the active requests resume, False = they fail with 503.
    num_slots: sequences decoded together (default: the engine's KV-cache slots).
    max_queue: requests allowed to wait for a slot; more are refused with 429.
    between_requests: called by the scheduler whenever no request is active (re-planning).
    blueprints: more Flask blueprints to mount (the master's shard server).
    poke_on: hands it the scheduler's `poke`, to call when between_requests has work even
      though no request comes (the registry's membership changed).
    """
    server = ApiServer(engine, host, port, api_key=api_key, model_name=model_name,
                       status_provider=status_provider, on_cluster_failure=on_cluster_failure,
                       num_slots=num_slots, max_queue=max_queue, between_requests=between_requests,
                       blueprints=blueprints)
    if poke_on is not None:
        poke_on(server.scheduler.poke)
    if threading.current_thread() is threading.main_thread():
        # Docker stops containers with SIGTERM; shut down cleanly instead of being killed.
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("HTTP API on http://%s:%d (model %s, %d sequence slots%s)", host, server.port, model_name,
             server.scheduler.num_slots, ", API key required" if api_key else "")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
