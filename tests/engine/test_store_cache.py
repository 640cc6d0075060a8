"""The shard-store cache against real files and processes: its key covers every source file a
store copies, it stays under its size cap by least-recently-used eviction, a store another
process has open is never deleted, and `tpi cache` lists and prunes it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tpi.engine import prepare_store
from tpi.weights import store_cache
from tpi.weights.store import MANIFEST


@pytest.fixture
def model(tiny_model, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_model("llama3"), src)
    return src


def test_an_edited_tokenizer_file_makes_a_new_store(model, tmp_path):
    root = tmp_path / "stores"
    first = prepare_store(str(model), [1, 1], "float32", root=root)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1234
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    second = prepare_store(str(model), [1, 1], "float32", root=root)
    assert second.root != first.root
    assert json.loads((second.model_dir / "tokenizer_config.json").read_text())["model_max_length"] == 1234
    assert prepare_store(str(model), [1, 1], "float32", root=root).root == second.root  # unchanged: reused


def test_the_cache_stays_under_its_cap_least_recently_used_first(model, tmp_path, monkeypatch):
    root = tmp_path / "stores"
    def prepared(weights) -> object:  # its directory; the ShardStore (which holds it open) goes
        return prepare_store(str(model), weights, "float32", root=root).root

    a = prepared([1, 1])
    size = store_cache.list_stores(root)[0].bytes
    monkeypatch.setenv("TPI_STORE_CACHE_MAX", str(int(size * 2.5)))
    b = prepared([1, 2])
    time.sleep(0.05)
    assert prepared([1, 1]) == a  # a is used again: b is now the least recently used
    c = prepared([2, 1])
    left = {s.path for s in store_cache.list_stores(root)}
    assert left == {a, c} and not b.exists()
    assert sum(s.bytes for s in store_cache.list_stores(root)) <= size * 2.5


def test_a_store_open_in_another_process_is_never_deleted(model, tmp_path):
    root = tmp_path / "stores"
    held = prepare_store(str(model), [1, 1], "float32", root=root)
    other = prepare_store(str(model), [1, 2], "float32", root=root)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tpi.weights.store import ShardStore; "
                               "s = ShardStore(sys.argv[1]); print('open', flush=True); time.sleep(60)",
                               str(held.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        del held, other  # this process lets go of both
        env = dict(os.environ, TPI_CACHE=str(tmp_path))
        listed = json.loads(subprocess.run([sys.executable, "-m", "tpi_cli", "cache", "list", "--json"], env=env,
                                           capture_output=True, text=True, check=True).stdout)
        assert sorted(s["in_use"] for s in listed) == [False, True]
        out = subprocess.run([sys.executable, "-m", "tpi_cli", "cache", "prune", "--max-size", "0"], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert "1 store(s) deleted" in out
        (kept,) = store_cache.list_stores(root)
        assert kept.in_use and (kept.path / MANIFEST).is_file()
    finally:
        holder.kill()
        holder.wait()
    assert store_cache.list_stores(root)[0].in_use is False
