"""Bad input gives a clear error, never a wrong answer."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tpi.settings import RuntimeOptions
from tpi.engine import build_inproc_engine, prepare_store
from tpi.settings import ModelSettings
from tpi.tokenizer import TokenizerError
from tpi.weights.store import ShardStore, StoreError, block_path


@pytest.fixture
def store(tiny_model, tmp_path):
    return prepare_store(str(tiny_model("qwen2")), [1, 2], "bfloat16", tmp_path / "store")


def test_truncated_block_refused_with_its_name(store):
    rel = block_path(1, 0, "mlp")
    path = store.root / rel
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"layer-000\.mlp.*truncated"):
        ShardStore(store.root).load_block(1, 0, "mlp")


def test_altered_block_refused_with_its_name(store):
    path = store.root / block_path(0, 1, "attn")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"layer-001\.attn.*sha256"):
        ShardStore(store.root).load_block(0, 1, "attn")


def test_deleted_block_refused(store):
    (store.root / block_path(0, 0, "attn")).unlink()
    with pytest.raises(StoreError, match="missing"):
        ShardStore(store.root).load_block(0, 0, "attn")


def test_incomplete_store_refused(store):
    (store.root / "manifest.json").unlink()
    with pytest.raises(StoreError, match="not a complete shard store"):
        ShardStore(store.root)


def test_prepare_is_idempotent(tiny_model, tmp_path):
    src = str(tiny_model("qwen2"))
    first = prepare_store(src, [1, 1], "bfloat16", tmp_path / "s")
    stamp = (first.root / "manifest.json").stat().st_mtime_ns
    second = prepare_store(src, [1, 1], "bfloat16", tmp_path / "s")
    assert (second.root / "manifest.json").stat().st_mtime_ns == stamp
    assert second.files == first.files


def test_missing_tokenizer(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama3"), model)
    (model / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="missing tokenizer"):
        build_inproc_engine(ModelSettings(str(model), [1]), RuntimeOptions())


def test_unsupported_architecture_on_the_command_line(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama3"), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "tpi_cli", "generate", "--model", str(model),
                           "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unsupported architecture FalconForCausalLM" in proc.stderr


def test_too_many_devices_on_the_command_line(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "tpi_cli", "generate", "--model", str(tiny_model("mistral")),
                           "--devices", "6", "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "only 5 query heads" in proc.stderr
