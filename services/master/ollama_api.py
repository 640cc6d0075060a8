"""Ollama-compatible endpoints on the master: /api/chat, /api/generate (NDJSON streams or one
object), /api/tags, /api/show, /api/ps, /api/version. A Flask blueprint mounted by http_api.

An Ollama request is translated into the OpenAI body the rest of the API already checks
(`to_openai`), so validation, the chat template, tool calls, JSON mode and the scheduler are
the same code for both dialects; only the response shapes (ollama_responses.py) differ.
Authentication is the app's rule for every /api/ path (http_api.check_api_key).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from tpi_master.errors import APIError, bad_request, wrong_type
from tpi_master.ollama_responses import OllamaReply, now_iso, model_details, parameter_count
from tpi_master.validation import parse_body, parse_chat, parse_completion

VERSION = "0.6.0"     # the Ollama API version whose shapes these endpoints follow
OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed",
           "stop": "stop", "num_predict": "max_tokens"}


def served_names(model_name: str) -> tuple[str, str]:
    """The model as Ollama clients list it ("name:latest") and the bare name; both are accepted."""
    tagged = model_name if ":" in model_name else model_name + ":latest"
    return tagged, model_name


def to_openai(body: dict, model_name: str) -> dict:
    """An Ollama /api/chat or /api/generate body -> the OpenAI body parse_chat/parse_completion check."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("'model' is required", "model", "missing_required_parameter")
    if model not in served_names(model_name):
        raise APIError(404, f"model '{model}' not found; this server serves '{served_names(model_name)[0]}'",
                       param="model", code="model_not_found")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise wrong_type("options", "an object")
    out = {"model": model_name, "stream": body.get("stream", True)}   # unset options: the model's defaults
    for name, openai_name in OPTIONS.items():
        if options.get(name) is not None:
            out[openai_name] = options[name]
    if isinstance(out.get("max_tokens"), int) and out["max_tokens"] < 0:
        del out["max_tokens"]                     # num_predict -1: until the context is full
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise bad_request("'format' must be \"json\" or a JSON schema object", "format")
    if body.get("tools") is not None:
        out["tools"] = body["tools"]
    return out


def chat_messages(messages) -> list:
    """Ollama messages -> OpenAI messages: tool calls' arguments are objects in Ollama and JSON
    strings in OpenAI; a tool result names its tool with `tool_name`."""
    if not isinstance(messages, list):
        return messages                           # parse_chat names the problem
    out = []
    for m in messages:
        if isinstance(m, dict):
            m = dict(m)
            calls = m.get("tool_calls")
            if isinstance(calls, list):
                m["tool_calls"] = [_openai_call(c, i) for i, c in enumerate(calls)]
            if m.get("role") == "tool" and "tool_name" in m:
                m["name"] = m.pop("tool_name")
            m.pop("images", None)
            m.pop("thinking", None)
            if m.get("content") is None:
                m["content"] = ""
        out.append(m)
    return out


def _openai_call(call, i: int):
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    if not isinstance(fn.get("arguments"), str):
        fn["arguments"] = json.dumps(fn.get("arguments") or {})
    return {"id": call.get("id") or f"call_{i}", "type": "function", "function": fn}


def ollama_blueprint(engine, start, model_name: str):
    """start(kind, spec) -> Completion: submits to the scheduler (http_api.create_app's)."""
    from flask import Blueprint, Response, jsonify, request

    bp = Blueprint("ollama", __name__)
    tokenizer = engine.tokenizer
    loaded_at = datetime.now(timezone.utc).isoformat()
    tagged = served_names(model_name)[0]

    @bp.errorhandler(APIError)
    def on_error(e: APIError):  # Ollama's error shape: {"error": "message"}
        resp = jsonify({"error": e.message})
        resp.status_code = e.status
        return resp

    def json_body() -> dict:
        body = parse_body(request.get_data())
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
        return body

    def reply(kind: str, spec, openai_kind: str, stream: bool):
        completion = start(openai_kind, spec)
        out = OllamaReply(kind, completion, tagged, time.monotonic())
        if stream:
            return Response(out.ndjson(), mimetype="application/x-ndjson",
                            headers={"X-Request-Id": completion.seq.id, "Cache-Control": "no-cache"})
        code, obj = out.body()
        resp = jsonify(obj)
        resp.status_code = code
        return resp

    @bp.post("/api/chat")
    def chat():
        body = json_body()
        openai_body = to_openai(body, model_name)
        openai_body["messages"] = chat_messages(body.get("messages"))
        spec = parse_chat(openai_body, engine, model_name)
        return reply("chat", spec, "chat", bool(openai_body["stream"]))

    @bp.post("/api/generate")
    def generate():
        body = json_body()
        openai_body = to_openai(body, model_name)
        prompt, system = body.get("prompt"), body.get("system")
        if prompt in (None, ""):  # Ollama's "load the model" request: it is loaded
            return jsonify({"model": tagged, "created_at": now_iso(), "response": "", "done": True,
                            "done_reason": "load"})
        if not isinstance(prompt, str):
            raise wrong_type("prompt", "a string")
        stream = bool(openai_body["stream"])
        if body.get("raw") or not tokenizer.chat_template:  # the prompt as it is
            spec = parse_completion({**openai_body, "prompt": prompt}, engine, model_name)
            return reply("generate", spec, "text", stream)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        spec = parse_chat({**openai_body, "messages": messages}, engine, model_name)
        return reply("generate", spec, "chat", stream)

    def entry() -> dict:
        store = engine.store
        size = sum(store.file_bytes(f) for f in store.files)
        return {"name": tagged, "model": tagged, "modified_at": loaded_at, "size": size,
                "digest": _digest(store),
                "details": model_details(store)}

    @bp.get("/api/tags")
    def tags():
        return jsonify({"models": [entry()]})

    @bp.get("/api/ps")
    def ps():
        return jsonify({"models": [{**entry(), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                                    "context_length": engine.generator.max_seq}]})

    @bp.post("/api/show")
    def show():
        body = json_body()
        name = body.get("model") or body.get("name")
        if name not in served_names(model_name):
            raise APIError(404, f"model '{name}' not found")
        cfg, store = engine.store.config, engine.store
        arch = cfg.family
        info = {"general.architecture": arch, "general.parameter_count": parameter_count(cfg),
                f"{arch}.context_length": engine.generator.max_seq, f"{arch}.embedding_length": cfg.hidden_size,
                f"{arch}.block_count": cfg.num_layers, f"{arch}.attention.head_count": cfg.num_heads,
                f"{arch}.attention.head_count_kv": cfg.num_kv_heads, f"{arch}.vocab_size": cfg.vocab_size,
                "tpi.devices": store.plan.world_size}
        caps = ["completion"] + (["tools"] if "tools" in (tokenizer.chat_template or "") else [])
        return jsonify({"license": "", "modelfile": "", "parameters": engine.generation.parameter_lines(),
                        "template": tokenizer.chat_template or "",
                        "details": model_details(store), "model_info": info, "capabilities": caps,
                        "modified_at": loaded_at})

    @bp.get("/api/version")
    def version():
        return jsonify({"version": VERSION})

    return bp


def _digest(store) -> str:
    import hashlib

    return hashlib.sha256((store.root / "manifest.json").read_bytes()).hexdigest()
