"""Shard delivery over real HTTP: stores made by the splitter from a tiny random Llama (and a
Qwen3-MoE with a dense MLP layer), served by the library's blueprint in its own server process."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tpi.config import load_model_config
from tpi.plan import make_plan
from tpi.cluster.delivery import DeliveryError, ShardClient, bearer
from tpi.weights.splitter import split_checkpoint
from tpi.weights.store import ShardStore, block_path

TOKEN = "shard-token"


@pytest.fixture(scope="module")
def stores(tiny_model, tmp_path_factory) -> Path:
    """Two stores of one model: A split 3 ways evenly, B split 2:1 (after a device left).
    Rank 2 of A and rank 1 of B hold the same heads and MLP columns."""
    model = tiny_model("llama3")
    cfg = load_model_config(model)
    root = tmp_path_factory.mktemp("served")
    split_checkpoint(model, make_plan(cfg, [1, 1, 1]), root / "store-a", "float32")
    split_checkpoint(model, make_plan(cfg, [2, 1]), root / "store-b", "float32")
    moe = tiny_model("qwen3_moe_mlp_only")  # a mixture of experts with a dense MLP layer
    split_checkpoint(moe, make_plan(load_model_config(moe), [2, 1]), root / "store-moe", "float32")
    return root


@pytest.fixture
def server(spawn, stores, tmp_path):
    def start(*extra: str) -> tuple[str, Path]:
        log = tmp_path / f"requests-{len(extra)}.log"
        proc = spawn("shard_server.py", "--root", str(stores), "--token", TOKEN, "--log", str(log), *extra)
        port = int(proc.expect("port ").split()[1])
        return f"http://127.0.0.1:{port}", log

    return start


def rank_bytes(store: ShardStore, rank: int) -> int:
    return sum(store.file_bytes(rel) for rel in store.block_files(rank))


def test_full_download_is_a_working_store(server, stores, tmp_path):
    url, _ = server()
    served = ShardStore(stores / "store-a")
    result = ShardClient(url, TOKEN, tmp_path / "cache").fetch("store-a", 1)
    n = served.config.num_layers
    # its layer blocks and its slice of the output head
    assert result.files_downloaded == len(served.block_files(1)) == 2 * n + 1 and result.files_reused == 0
    assert result.bytes_downloaded == rank_bytes(served, 1)
    got = result.store
    assert got.plan == served.plan and got.config == served.config
    for layer in range(n):
        for kind in ("attn", "mlp"):
            mine, ref = got.load_block(1, layer, kind), served.load_block(1, layer, kind)
            assert mine.keys() == ref.keys()
            assert all(torch.equal(mine[k], ref[k]) for k in ref)
    # The materialised directory holds only this rank; the files are links into the cache.
    assert not (got.root / "rank-0").exists()
    assert (got.root / block_path(1, 0, "attn")).stat().st_nlink >= 2


def test_moe_with_dense_layers_downloads_its_dense_and_expert_blocks(server, stores, tmp_path):
    """Rank 1 of a Qwen3-MoE whose layer 1 is dense: its sparse layers' router and experts
    and its dense layer's MLP pieces arrive, byte for byte, and nothing else."""
    url, _ = server()
    served = ShardStore(stores / "store-moe")
    got = ShardClient(url, TOKEN, tmp_path / "cache").fetch("store-moe", 1).store
    files = served.block_files(1)
    assert [rel for rel in files if ".dense" in rel] == [block_path(1, 1, "dense")]
    assert any(".expert" in rel for rel in files) and not any(".expert" in rel and "layer-001" in rel for rel in files)
    for layer, kind, piece in served.execution_order(1):
        mine, ref = got.load_block(1, layer, kind, piece), served.load_block(1, layer, kind, piece)
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert sorted(p.name for p in (got.root / "rank-1").iterdir()) == sorted(Path(rel).name for rel in files)


def test_resume_after_interrupted_transfers(server, stores, tmp_path):
    url, log = server("--drop-after", "3000")
    served = ShardStore(stores / "store-a")
    result = ShardClient(url, TOKEN, tmp_path / "cache").fetch("store-a", 2)
    big = [rel for rel in served.block_files(2) if served.file_bytes(rel) > 3000]
    assert big, "the tiny model's blocks should be larger than the cut"
    assert result.resumed == len(big)
    assert result.bytes_downloaded == rank_bytes(served, 2)  # nothing was fetched twice
    ranges = [line.split() for line in log.read_text().splitlines() if "/files/" in line]
    assert sum(1 for _, rng, status in ranges if rng == "bytes=3000-" and status == "206") == len(big)
    result.store.load_block(2, 0, "mlp")


def test_resume_across_a_restart_of_the_client(server, stores, tmp_path):
    url, _ = server("--drop-after", "3000")
    cache = tmp_path / "cache"
    with pytest.raises(DeliveryError, match="kept for resuming"):
        ShardClient(url, TOKEN, cache, attempts=1).fetch("store-a", 0)
    partial = list((cache / "partial").iterdir())
    assert len(partial) == 1 and partial[0].stat().st_size == 3000
    result = ShardClient(url, TOKEN, cache).fetch("store-a", 0)  # a new process would do the same
    served = ShardStore(stores / "store-a")
    assert result.resumed >= 1
    assert result.bytes_downloaded == rank_bytes(served, 0) - 3000


def test_altered_byte_on_the_server_is_refused_then_fetched_when_fixed(server, stores, tmp_path):
    url, _ = server()
    rel = block_path(1, 1, "mlp")
    path = stores / "store-a" / rel
    original = path.read_bytes()
    altered = bytearray(original)
    altered[len(altered) // 2] ^= 0x01
    cache = tmp_path / "cache"
    path.write_bytes(bytes(altered))
    try:
        with pytest.raises(DeliveryError) as err:
            ShardClient(url, TOKEN, cache).fetch("store-a", 1)
        assert rel in str(err.value) and "altered or corrupt" in str(err.value)
        assert not any((cache / "partial").iterdir())
    finally:
        path.write_bytes(original)
    result = ShardClient(url, TOKEN, cache).fetch("store-a", 1)
    assert result.files_downloaded >= 1
    result.store.load_block(1, 1, "mlp")


def test_corrupt_cache_file_is_deleted_and_fetched_again(server, stores, tmp_path):
    url, _ = server()
    cache = tmp_path / "cache"
    client = ShardClient(url, TOKEN, cache)
    first = client.fetch("store-a", 2)
    rel = block_path(2, 0, "attn")
    sha = first.store.files[rel].sha256
    blob = cache / "sha256" / sha
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    again = client.fetch("store-a", 2)
    assert again.files_downloaded == 1 and again.bytes_downloaded == first.store.file_bytes(rel)
    again.store.load_block(2, 0, "attn")


def test_replan_reuses_cached_blocks(server, stores, tmp_path):
    url, log = server()
    cache = tmp_path / "cache"
    client = ShardClient(url, TOKEN, cache)
    before = client.fetch("store-a", 2)
    assert before.bytes_downloaded > 0
    # Device 1 left; the plan [2, 1] gives this worker (now rank 1) the same slice.
    after = client.fetch("store-b", 1)
    assert after.files_downloaded == 0 and after.bytes_downloaded == 0
    assert after.files_reused == 2 * after.store.config.num_layers + 1  # + the same vocabulary slice
    assert not [line for line in log.read_text().splitlines() if line.startswith("/shards/store-b/files/")]
    a, b = before.store.load_block(2, 1, "attn"), after.store.load_block(1, 1, "attn")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A rank whose slice changed is downloaded (only what differs).
    changed = client.fetch("store-b", 0)
    assert changed.files_downloaded > 0


def _get(url: str, store_id: str, token: str = TOKEN) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {bearer(token, store_id)}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_wrong_token_and_path_traversal_are_refused(server, stores, tmp_path):
    url, _ = server()
    with pytest.raises(DeliveryError, match="join token"):
        ShardClient(url, "not the token", tmp_path / "cache").fetch("store-a", 1)
    base = f"{url}/shards"
    assert _get(f"{base}/store-a/files/{block_path(1, 0, 'attn')}", "store-a") == 200
    assert _get(f"{base}/store-a/files/{block_path(1, 0, 'attn')}", "store-a", "wrong") == 401
    assert _get(f"{base}/store-a/files/{block_path(1, 0, 'attn')}", "store-b") == 401  # bearer is per store
    assert (stores / "store-a" / "model" / "config.json").is_file()
    for path, sid in [("store-a/files/model/config.json", "store-a"),       # on disk, not in the manifest
                      ("store-a/files/../store-b/manifest.json", "store-a"),
                      ("store-a/files/%2e%2e/%2e%2e/etc/passwd", "store-a"),
                      ("store-a/files/rank-1/..%2f..%2fmanifest.json", "store-a"),
                      ("..%2f..%2fetc/manifest", ".."),
                      ("nope/manifest", "nope")]:
        assert _get(f"{base}/{path}", sid) in (400, 404), path


def test_server_must_prove_the_token(tmp_path):
    """A server that accepts any bearer but cannot sign the manifest is not trusted."""
    body = json.dumps({"format": 1}).encode()

    class Impostor(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DeliveryError, match="did not prove"):
            ShardClient(f"http://127.0.0.1:{httpd.server_port}", TOKEN, tmp_path / "c").fetch("store-a", 0)
    finally:
        httpd.shutdown()
