"""Check an OpenAI request body and turn it into what the scheduler runs: prompt token ids,
sampling parameters, stop strings and streaming options. Every problem is an `APIError`
(400, or 404 for an unknown model) that names the offending parameter."""
from __future__ import annotations

import math
from dataclasses import dataclass

from tpi.model.sampling import SamplingParams
from tpi.tokenizer import TokenizerError
from tpi.wsgi import parse_json
from tpi_master.errors import APIError, bad_request, unsupported, wrong_type
from tpi_master.features import (Features, parse_chat_logprobs, parse_completion_logprobs, parse_response_format,
                                 parse_tools, tool_message, tool_parameters)

ROLES = {"system", "user", "assistant", "developer", "tool"}
MAX_STOP = 4
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # what torch.Generator.manual_seed takes
TOP_K_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class GenerationSpec:
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    echo: str = ""                  # /v1/completions with echo: the prompt text, sent first
    features: Features = Features()  # tools, JSON mode, log probabilities (features.py)
    speculative: bool = True        # false: no draft tokens for this request (plain decoding)


def parse_body(data: bytes):
    """The request body as JSON. Refused with a 400: not JSON, NaN/Infinity (not JSON either),
    nesting too deep for the parser. (Its size is capped by the server, tpi.wsgi.)"""
    if not data:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return parse_json(data)
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Body:
    """Typed access to the request's fields; each getter checks type and range."""

    def __init__(self, body):
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
        self.body = body

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_number(v) or not math.isfinite(v):
            raise wrong_type(name, "a finite number")
        if v < lo or v > hi or (lo_open and v == lo):
            raise bad_request(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}]; got {v}", name)
        return float(v)

    def integer(self, name: str, default: int | None, lo: int | None = None,
                hi: int | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_int(v):
            raise wrong_type(name, "an integer")
        if lo is not None and v < lo:
            raise bad_request(f"'{name}' must be at least {lo}; got {v}", name)
        if hi is not None and v > hi:
            raise bad_request(f"'{name}' must be at most {hi}; got {v}", name)
        return v

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise wrong_type(name, "a boolean")
        return v

    def stop(self) -> tuple[str, ...]:
        v = self.body.get("stop")
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise wrong_type("stop", "a string or an array of strings")
        if len(v) > MAX_STOP:
            raise bad_request(f"'stop' takes at most {MAX_STOP} strings; got {len(v)}", "stop")
        return tuple(s for s in v if s)

    def check_model(self, served: str) -> None:
        v = self.body.get("model")
        if v is None:
            return
        if not isinstance(v, str):
            raise wrong_type("model", "a string")
        if v != served:
            raise APIError(404, f"The model '{v}' does not exist; this server serves '{served}'",
                           param="model", code="model_not_found")

    def refuse_unsupported(self) -> None:
        n = self.integer("n", 1, lo=1)
        if n != 1:
            raise unsupported("n", "more than one choice")
        for name in ("presence_penalty", "frequency_penalty"):
            if self.number(name, 0.0, -2.0, 2.0) != 0.0:
                raise unsupported(name, "a non-zero penalty")
        if self.body.get("logit_bias") not in (None, {}):
            raise unsupported("logit_bias", "a logit bias")
        if self.body.get("suffix") is not None:
            raise unsupported("suffix", "a suffix")


def _sampling(b: _Body, prompt_len: int, engine, prompt_param: str) -> tuple[SamplingParams, bool]:
    """The sampling parameters; those the request leaves out are the model's (engine.generation)."""
    max_seq, defaults = engine.generator.max_seq, engine.generation
    b.refuse_unsupported()
    if prompt_len == 0:
        raise bad_request("the prompt is empty", prompt_param, "empty_prompt")
    if prompt_len >= max_seq:
        raise bad_request(f"This model's maximum context length is {max_seq} tokens; the prompt has "
                          f"{prompt_len} tokens", prompt_param, "context_length_exceeded")
    room = max_seq - prompt_len
    name = "max_completion_tokens" if b.present("max_completion_tokens") else "max_tokens"
    max_tokens = b.integer(name, None)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens < 1:
        raise bad_request(f"'{name}' must be a positive integer; got {max_tokens}", name)
    elif max_tokens > room:
        raise bad_request(f"This model's maximum context length is {max_seq} tokens; you asked for "
                          f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to "
                          f"generate)", name, "context_length_exceeded")
    params = SamplingParams(
        temperature=b.number("temperature", defaults.temperature, 0.0, 2.0),
        top_p=b.number("top_p", defaults.top_p, 0.0, 1.0, lo_open=True),
        top_k=b.integer("top_k", defaults.top_k, lo=0, hi=TOP_K_MAX),
        seed=b.integer("seed", None, *SEED_RANGE),
        max_new_tokens=max_tokens,
    )
    return params, b.boolean("ignore_eos")


def _stream_options(b: _Body, stream: bool) -> bool:
    opts = b.body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise wrong_type("stream_options", "an object")
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    inc = opts.get("include_usage", False)
    if not isinstance(inc, bool):
        raise wrong_type("stream_options.include_usage", "a boolean")
    return inc


def _message_text(msg, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise wrong_type(where, "an object with 'role' and 'content'")
    role = msg.get("role")
    if not isinstance(role, str):
        raise wrong_type(f"{where}.role", "a string")
    if role not in ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}; got '{role}'",
                          f"{where}.role")
    if role == "tool" or (role == "assistant" and msg.get("tool_calls")):
        return tool_message(msg, where)
    content = msg.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"'{where}.content[{j}]' must be a text part "
                                  "({{\"type\": \"text\", \"text\": ...}})", f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise wrong_type(f"{where}.content", "a string or an array of text parts")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_chat(body, engine, model_name: str) -> GenerationSpec:
    tokenizer = engine.tokenizer
    b = _Body(body)
    b.check_model(model_name)
    messages = b.body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise wrong_type("messages", "an array of messages")
    if not messages:
        raise bad_request("'messages' must contain at least one message", "messages", "empty_array")
    chat = [_message_text(m, i) for i, m in enumerate(messages)]
    stream = b.boolean("stream")
    include_usage = _stream_options(b, stream)
    stop = b.stop()
    tools, fmt, forced = parse_tools(b.body, tokenizer.chat_template)
    json_mode, schema = parse_response_format(b.body)
    if forced:   # the reply is the call's arguments: an object of the function's parameters
        json_mode, schema = True, tool_parameters(tools, forced)
    features = Features(tools, fmt, forced, json_mode, schema, parse_chat_logprobs(b.body))
    try:
        ids = tokenizer.encode_chat(chat, tools, fmt.opening(forced) if forced else "")
    except TokenizerError as e:
        raise bad_request(str(e), "messages") from None
    params, ignore_eos = _sampling(b, len(ids), engine, "messages")
    return GenerationSpec(ids, params, stop, stream, include_usage, ignore_eos, features=features,
                          speculative=b.boolean("speculative", True))


def parse_completion(body, engine, model_name: str) -> GenerationSpec:
    tokenizer = engine.tokenizer
    b = _Body(body)
    b.check_model(model_name)
    prompt = b.body.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids, text = tokenizer.encode(prompt), prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        vocab = tokenizer.tok.get_vocab_size()
        if any(t < 0 or t >= vocab for t in prompt):
            raise bad_request(f"token ids in 'prompt' must be in [0, {vocab})", "prompt")
        ids, text = list(prompt), tokenizer.decode(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise unsupported("prompt", "a batch of several prompts")
    else:
        raise wrong_type("prompt", "a string, or an array of token ids")
    stream = b.boolean("stream")
    include_usage = _stream_options(b, stream)
    stop = b.stop()
    echo = b.boolean("echo")
    params, ignore_eos = _sampling(b, len(ids), engine, "prompt")
    logprobs = parse_completion_logprobs(b.body)
    json_mode, schema = parse_response_format(b.body)
    features = Features(json_mode=json_mode, schema=schema, logprobs=logprobs,
                        score_prompt=echo and logprobs is not None)
    return GenerationSpec(ids, params, stop, stream, include_usage, ignore_eos, text if echo else "", features,
                          speculative=b.boolean("speculative", True))
