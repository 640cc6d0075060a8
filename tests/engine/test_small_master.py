"""The small master: the output head split by vocabulary with a distributed top-k, the
embedding read row by row, and blocks cut into pieces.

References are real: the checkpoint's own tensors (read with safetensors) for the full head
and the full embedding table; the unsplit store for pieces; Hugging Face greedy output is
covered by test_hf_equivalence.py (which runs through the same vocabulary-split head)."""
from __future__ import annotations

import threading

import pytest
import torch

from tpi.comm.inproc import InProcGroup
from tpi.settings import RuntimeOptions
from tpi.engine import build_inproc_engine, load_resident_runner, prepare_store
from tpi.settings import ModelSettings
from tpi.model.head import Candidates
from tpi.model.layers import rms_norm
from tpi.model.sampling import SamplingParams, choose_token
from tpi.weights.checkpoint import Checkpoint
from tpi.weights.embedding import EmbeddingRows
from tpi.weights.store import EMBED_PATH, StoreError

SPLITS = [[1.0], [1.0, 2.0], [1.0, 1.0, 3.0], [2.0, 1.0, 1.0, 1.0, 1.0]]
F32 = RuntimeOptions(dtype="float32", max_seq=32)
PROMPT = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]


def full_head(model_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """(final_norm (H,), output head (vocab, H)) in float32, from the checkpoint."""
    ckpt = Checkpoint(model_dir)
    names = ckpt.names()
    head = ckpt.get("lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight")
    return ckpt.get("model.norm.weight").float(), head.float()


def distributed_candidates(store, opts, h: torch.Tensor) -> Candidates:
    """Every device's runner scores its vocabulary slice of h (R, H); one gather merges them
    on the master."""
    n = store.plan.world_size
    runners = [load_resident_runner(store, r, opts) for r in range(n)]   # only their head is used
    group = InProcGroup(n, timeout_s=60)
    out: list = [None] * n

    def run(rank):
        out[rank] = runners[rank].head_candidates(h, group.communicator(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out[0] is not None and all(c is None for c in out[1:])  # the master only
    return out[0]


@pytest.mark.parametrize("weights", SPLITS, ids=lambda w: f"N{len(w)}")
@pytest.mark.parametrize("model", ["smollm2", "llama3", "llama-tied"])
def test_vocab_split_topk_equals_the_full_head(smollm2_dir, tiny_model, model, weights):
    model_dir = smollm2_dir if model == "smollm2" else tiny_model(model)
    # a small cap cuts each device's head slice into several pieces as well
    store = prepare_store(str(model_dir), weights, "float32", max_block_bytes=1 << 20)
    assert any(len(store.pieces(r)["head"]) > 1 for r in range(len(weights)))
    cfg = store.config
    torch.manual_seed(len(weights))
    h = torch.randn(16, cfg.hidden_size) * 3                                  # (R, H) final hidden states
    norm, head = full_head(model_dir)
    logits = rms_norm(h, norm, cfg.rms_norm_eps) @ head.T                      # (R, vocab) the full head
    cands = distributed_candidates(store, F32, h)
    assert cands.values.shape == (16, len(weights) * 128)
    # greedy: the same token as the full head's argmax, for every row
    assert torch.equal(cands.argmax(), logits.argmax(-1))
    # the best 128 overall are among the candidates, with the full head's logits
    top = torch.topk(logits, 128, dim=-1)
    merged = cands.logits()                                                   # (R, vocab), -inf elsewhere
    assert torch.equal(torch.topk(merged, 128, dim=-1).indices.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(merged.gather(-1, top.indices), top.values, rtol=1e-5, atol=1e-4)
    # top-k sampling with k <= K draws from exactly the same distribution
    params = SamplingParams(temperature=0.8, top_k=40, seed=7)
    for row in range(4):
        a = choose_token(merged[row].clone(), params, torch.Generator().manual_seed(row))
        b = choose_token(logits[row].clone(), params, torch.Generator().manual_seed(row))
        assert a == b


def test_head_topk_is_capped_by_the_smallest_vocab_slice(tiny_model):
    store = prepare_store(str(tiny_model("llama3")), [1.0, 2.0], "float32")
    cands = distributed_candidates(store, RuntimeOptions(dtype="float32", max_seq=32, head_topk=5),
                                   torch.randn(3, store.config.hidden_size))
    assert cands.values.shape == (3, 10)
    assert all(len(set(row.tolist())) == 10 for row in cands.ids)


@pytest.mark.parametrize("chunk_rows", [5, 128])
def test_bfloat16_candidates_are_rescored_in_float32_chunk_by_chunk(smollm2_dir, monkeypatch, chunk_rows):
    """A bfloat16 head picks its candidates from bfloat16 logits and rescores them in float32
    a few rows of the head at a time (head.RESCORE_BYTES): 5 rows per chunk (26 chunks per
    row of h, the last one partial) must give the float32 logits of the full head's rows."""
    from tpi.model import head

    monkeypatch.setattr(head, "RESCORE_BYTES", chunk_rows * 4 * 576)
    store = prepare_store(str(smollm2_dir), [1.0, 2.0], "bfloat16", max_block_bytes=1 << 20)
    cfg = store.config
    torch.manual_seed(3)
    h = (torch.randn(6, cfg.hidden_size) * 3).to(torch.bfloat16)              # (R, H) final hidden states
    norm, table = full_head(smollm2_dir)
    hn = rms_norm(h, norm.to(torch.bfloat16), cfg.rms_norm_eps)                # (R, H) bfloat16, as the head has it
    logits = hn.float() @ table.to(torch.bfloat16).float().T                   # (R, vocab) float32
    cands = distributed_candidates(store, RuntimeOptions(dtype="bfloat16", max_seq=32), h)
    torch.testing.assert_close(cands.values, logits.gather(-1, cands.ids), rtol=1e-5, atol=1e-4)
    assert torch.equal(cands.argmax(), logits.argmax(-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedding_rows_equal_the_full_table(smollm2_dir, dtype):
    store = prepare_store(str(smollm2_dir), [1.0, 1.0], dtype)
    table = Checkpoint(smollm2_dir).get("model.embed_tokens.weight")         # (vocab, H)
    emb = EmbeddingRows(store, torch.float32)
    ids = torch.tensor([[0, 5, 49151, 5, 1234], [7, 7, 7, 0, 300]])          # repeats, both ends
    got = emb.embed(ids)                                                      # (2, 5, H)
    want = table.to(getattr(torch, dtype))[ids].float()
    assert got.shape == (2, 5, 576) and torch.equal(got, want)
    assert emb.hashed == 1                                                    # verified once, at open
    with pytest.raises(ValueError, match="token ids must lie in"):
        emb.embed(torch.tensor([[49152]]))


def test_altered_embedding_file_is_refused(smollm2_dir, tmp_path):
    store = prepare_store(str(smollm2_dir), [1.0], "bfloat16", out=tmp_path / "store")
    emb = EmbeddingRows(store, torch.float32)
    emb.embed(torch.tensor([[3, 4]]))
    path = store.root / EMBED_PATH
    with open(path, "r+b") as f:                                              # one byte of row 4, in place
        offset, row_bytes, _, _ = emb.parts["embed"]
        f.seek(offset + 4 * row_bytes + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match="embed.safetensors failed its sha256 check"):
        emb.embed(torch.tensor([[3, 4]]))


def test_pieces_give_the_same_tokens_and_respect_the_cap(tiny_model):
    model = tiny_model("llama3")
    cap = 40 << 10
    store = prepare_store(str(model), [1.0, 2.0], "float32", max_block_bytes=cap)
    for rank in range(2):
        pieces = store.pieces(rank)
        shard = store.plan.shards[rank]
        assert len(pieces["mlp"]) > 1 and len(pieces["head"]) > 1
        # the pieces tile the device's MLP columns and vocabulary slice exactly
        assert pieces["mlp"][0][0] == 0 and pieces["mlp"][-1][1] == shard.mlp_width
        assert pieces["head"][0][0] == shard.vocab[0] and pieces["head"][-1][1] == shard.vocab[1]
        for kind in ("mlp", "head"):
            assert all(a[1] == b[0] for a, b in zip(pieces[kind], pieces[kind][1:]))
        for rel in store.block_files(rank):
            if ".mlp." in rel or "/head" in rel:
                assert store.file_bytes(rel) <= cap + 4096                    # + header and norms
    tokens = {}
    for name, c in (("whole", 64 << 20), ("pieces", cap)):
        engine = build_inproc_engine(ModelSettings(str(model), [1.0, 2.0], max_block_bytes=c), F32)
        try:
            engine.generator.stop_ids = set()
            tokens[name] = engine.generator.generate(PROMPT, SamplingParams(max_new_tokens=12)).tokens
        finally:
            engine.close()
    assert tokens["pieces"] == tokens["whole"] and len(set(tokens["whole"])) > 3
