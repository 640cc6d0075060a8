"""Log probabilities in the OpenAI shapes (tpi.generation.logprobs computes them):
chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`;
completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, the prompt's
tokens first with echo (the first has no log probability: null), as lm-evaluation-harness
reads them."""
from __future__ import annotations

from tpi.generation.logprobs import TokenLogprob
from tpi_master.features import Features


class LogprobFormat:
    def __init__(self, tokenizer, features: Features, req):
        self.tokenizer, self.features, self.req = tokenizer, features, req   # req: scheduler.Request

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat(self, lps: list[TokenLogprob] | None) -> dict | None:
        if self.features.logprobs is None or lps is None:
            return None

        def entry(token: int, lp: float) -> dict:
            t = self._text(token)
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}

        return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(i, v) for i, v in x.top]}
                            for x in lps]}

    def text(self, lps: list[TokenLogprob] | None, echo: str) -> dict | None:
        if self.features.logprobs is None or lps is None:
            return None
        entries: list[TokenLogprob | None] = []
        tokens: list[int] = []
        if echo and self.features.score_prompt:
            entries += self.req.seq.prompt_logprobs
            tokens += self.req.seq.prompt
        entries += lps
        tokens += [x.token for x in lps]
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for token, x in zip(tokens, entries):
            t = self._text(token)
            out["tokens"].append(t)
            out["text_offset"].append(offset)
            offset += len(t)
            out["token_logprobs"].append(None if x is None else x.logprob)
            out["top_logprobs"].append(None if x is None else {self._text(i): v for i, v in x.top})
        return out
