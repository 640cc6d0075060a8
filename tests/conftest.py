"""Shared fixtures: the embedded SmolLM2 model and small random-weight models of each family."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from reference import make_tiny_model  # tests/ is on sys.path (rootdir conftest)

# Tests write their stores under the repository's .test-cache (gitignored), never the
# user's ~/.cache/tpi; the converted SmolLM2 there is reused across runs.
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TPI_CACHE", str(REPO / ".test-cache"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from tpi.weights.sources import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir):
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(family, tmp_path_factory.mktemp(family), smollm2_dir)
        return made[family]

    return get




@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from tpi.weights.sources import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory, smollm2_gguf):
    """gguf_model(family, qtype) -> a GGUF file of a random-weight model (tests/gguf_models.py).
    Written anew each session at a fixed path under the test cache, so the stores cut from it
    (named by the source's path) are rebuilt in place instead of piling up."""
    from gguf_models import make_hf_model, write_gguf
    from tpi.weights.sources import cache_dir

    hf: dict[str, Path] = {}
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, qtype: str) -> Path:
        if family not in hf:
            hf[family] = make_hf_model(family, tmp_path_factory.mktemp(f"hf-{family}"))
        if (family, qtype) not in made:
            out = cache_dir() / "gguf-models" / f"{family}-{qtype}.gguf"
            out.parent.mkdir(parents=True, exist_ok=True)
            made[family, qtype] = write_gguf(hf[family], out, qtype, smollm2_gguf,
                                             legacy_experts=family.endswith("-legacy"))
        return made[family, qtype]

    get.hf_dir = lambda family: hf[family]
    return get


@pytest.fixture(scope="session")
def gguf_greedy_reference(gguf_model):
    """gguf_greedy_reference(family, qtype, prompt, n): transformers' greedy tokens for the
    gguf_model file (dequantized, float32), computed once per session."""
    from gguf_models import hf_greedy_gguf

    cache: dict = {}

    def get(family: str, qtype: str, prompt: list[int], new_tokens: int) -> list[int]:
        key = (family, qtype, tuple(prompt), new_tokens)
        if key not in cache:
            cache[key] = hf_greedy_gguf(gguf_model(family, qtype), prompt, new_tokens, gguf_model.hf_dir(family))
        return cache[key]

    return get
