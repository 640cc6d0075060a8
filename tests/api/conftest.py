"""A real master (`tpi master --devices 2`, SmolLM2) per test module, and clients of it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/procs.py
from procs import start_master  # noqa: E402


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    server = start_master(tmp_path_factory.mktemp("master"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(master):
    from openai import OpenAI

    return OpenAI(base_url=master.url + "/v1", api_key="unused", max_retries=0, timeout=120)
