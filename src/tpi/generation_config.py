"""The model's own generation settings (`generation_config.json`), read once: its extra stop
tokens and the sampling defaults that a request which names none gets: every route of the
HTTP API (OpenAI and Ollama, through services/master/validation.py), /v1/models and Ollama's
/api/show (which show them), and through the API the web UI's controls.

Read with transformers' meaning, so a model behaves here as its authors ran it:
 * `do_sample` true: sampling with the file's `temperature` (1.0 if absent), `top_p` (1.0)
   and `top_k` (50, transformers' default);
 * `do_sample` false or absent: greedy (temperature 0). The embedded SmolLM2's file names no
   sampling at all, so it answers greedily, as `model.generate()` would: "What is the
   capital of France?" -> Paris. (At the web UI's former 0.7 it was seen answering
   Amsterdam.)
 * no file: the OpenAI API's defaults (temperature 1, top_p 1, no top-k).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FILE = "generation_config.json"


@dataclass(frozen=True)
class GenerationConfig:
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = no top-k cut
    eos_token_ids: tuple[int, ...] = ()
    source: str = "OpenAI API defaults (the model has no generation_config.json)"

    def sampling_json(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "source": self.source}

    def parameter_lines(self) -> str:
        """The defaults as a Modelfile's PARAMETER lines ("temperature 0", ...): what Ollama's
        /api/show reports as the model's `parameters`."""
        return "\n".join(f"{k} {v:g}" for k, v in
                         (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k)))


def load_generation_config(model_dir: str | Path) -> GenerationConfig:
    path = Path(model_dir) / FILE
    if not path.is_file():
        return GenerationConfig()
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos_ids):
            raise ValueError(f"eos_token_id {eos!r} is not a token id or a list of them")
        if not raw.get("do_sample", False):
            return GenerationConfig(0.0, 1.0, 0, eos_ids, f"{FILE} (greedy: no do_sample)")
        temperature = _number(raw, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(raw, "top_p", 1.0, 0.0, 1.0)
        top_k = int(_number(raw, "top_k", 50, 0, 2 ** 31 - 1))
        return GenerationConfig(temperature, top_p, top_k, eos_ids, f"{FILE} (do_sample)")
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"cannot read {path}: {e}") from None


def _number(raw: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = raw.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} {v!r} is not a number in [{lo}, {hi}]")
    return v
