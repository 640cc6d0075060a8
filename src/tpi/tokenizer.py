"""Tokenizer and chat template, read from `tokenizer.json` and `tokenizer_config.json`
with the `tokenizers` library and Jinja (no transformers at run time)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """The model directory has no usable tokenizer."""


class ChatTokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"missing tokenizer: no tokenizer.json in {model_dir}")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot read {path}: {e}") from e
        cfg_path = model_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        tmpl_file = model_dir / "chat_template.jinja"
        if not self.chat_template and tmpl_file.is_file():
            self.chat_template = tmpl_file.read_text()
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self._compiled = None
        self._texts: list[str] | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tok.token_to_id(text)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The conversation as the model's chat template writes it; `tools` (OpenAI function
        definitions) go to the template as Hugging Face's apply_chat_template passes them."""
        if not self.chat_template:
            raise TokenizerError("this model's tokenizer has no chat template; use a plain prompt")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, reply_prefix: str = "") -> list[int]:
        """Token ids of the rendered conversation, then `reply_prefix` (the start of the reply,
        e.g. an opened tool call). The template already places every special token."""
        return self.encode(self.render_chat(messages, tools=tools) + reply_prefix, add_special_tokens=False)

    def token_texts(self) -> list[str]:
        """Each token id's text as it reads after other text (decoded after an anchor token,
        so a leading space is kept); "" for special tokens and for tokens that are part of a
        multi-byte character. Computed once (~1 s for 150k tokens)."""
        if self._texts is None:
            anchor = self.encode("a", add_special_tokens=False)[-1]
            base = self.tok.decode([anchor])
            rows = self.tok.decode_batch([[anchor, i] for i in range(self.tok.get_vocab_size())])
            self._texts = [r[len(base):] if r.startswith(base) and "\ufffd" not in r else "" for r in rows]
        return self._texts

    def stop_ids(self) -> set[int]:
        ids = {self.token_id(self.eos_token)}
        return {i for i in ids if i is not None}


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _compile(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
