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


