"""A bad GGUF file is refused with an error naming the cause, before any store is written."""
from __future__ import annotations

import shutil

import pytest

from gguf_models import write_gguf
from tpi.config import UnsupportedModelError
from tpi.engine import prepare_store
from tpi.weights.gguf_file import GGUFError
from tpi.weights.store import MANIFEST, ShardStore, StoreError


def refused(path, tmp_path, error, match):
    out = tmp_path / "store"
    with pytest.raises(error, match=match):
        prepare_store(str(path), [1.0, 2.0], "bfloat16", out)
    assert not (out / MANIFEST).exists()
    with pytest.raises(StoreError, match="not a complete shard store"):
        ShardStore(out)


@pytest.fixture(scope="module")
def variant(gguf_model, smollm2_gguf, tmp_path_factory):
    gguf_model("llama", "Q8_0")  # makes the Hugging Face model too

    def make(name, family="llama", **kw):
        gguf_model(family, "Q8_0")
        out = tmp_path_factory.mktemp("bad") / f"{name}.gguf"
        return write_gguf(gguf_model.hf_dir(family), out, "Q8_0", smollm2_gguf, **kw)

    return make


def test_truncated_file(gguf_model, tmp_path):
    good = gguf_model("llama", "Q8_0")
    bad = tmp_path / "cut.gguf"
    data = good.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.7)])
    refused(bad, tmp_path, GGUFError, r"cut\.gguf is truncated: tensor \S+ needs bytes up to \d+, the file has \d+")


def test_unsupported_tensor_type(variant, tmp_path):
    bad = variant("q2k", types={"blk.1.ffn_up.weight": "Q2_K"})
    refused(bad, tmp_path, GGUFError, r"blk\.1\.ffn_up\.weight has GGML type Q2_K, which TPI does not read")


def test_unsupported_architecture(variant, tmp_path):
    bad = variant("phi2", metadata={"general.architecture": "phi2"})
    refused(bad, tmp_path, UnsupportedModelError, r"GGUF architecture 'phi2' is not supported")


def test_metadata_disagreeing_with_tensors(variant, tmp_path):
    bad = variant("ffn", metadata={"llama.feed_forward_length": 640})
    refused(bad, tmp_path, GGUFError, r"metadata disagrees with the tensors: blk\.0\.ffn_\w+\.weight has shape")


def test_missing_split_part(gguf_model, tmp_path):
    part = tmp_path / "model-00001-of-00002.gguf"
    shutil.copyfile(gguf_model("llama", "Q8_0"), part)
    refused(part, tmp_path, GGUFError, r"model-00002-of-00002\.gguf missing")


def test_expert_count_disagreeing_with_the_stacked_experts(variant, tmp_path):
    bad = variant("experts", family="mixtral", metadata={"llama.expert_count": 4})
    refused(bad, tmp_path, GGUFError, r"metadata disagrees with the tensors: blk\.0\.ffn_\w+\.weight "
            r"has 3 experts, llama\.expert_count is 4")


def test_expert_width_disagreeing_with_the_stacked_experts(variant, tmp_path):
    bad = variant("width", family="qwen3_moe", metadata={"qwen3moe.expert_feed_forward_length": 512})
    refused(bad, tmp_path, GGUFError, r"metadata disagrees with the tensors: blk\.0\.ffn_\w+_exps\.weight has "
            r"shape \(5, \d+, \d+\), the metadata \(qwen3moe\.\*\) implies")


def test_gemma3_head_dim_disagreeing_with_the_tensors(variant, tmp_path):
    bad = variant("gemma", family="gemma3", metadata={"gemma3.attention.key_length": 128})
    refused(bad, tmp_path, GGUFError, r"metadata disagrees with the tensors: blk\.0\.attn_\w+\.weight has shape")


def test_mixture_block_without_its_experts(variant, tmp_path):
    bad = variant("noup", family="mixtral", drop=("blk.1.ffn_up_exps.weight",))
    refused(bad, tmp_path, GGUFError, r"noup\.gguf: block 1 has no ffn_up_exps\.weight \(or not every expert.s\) \(mixtral has experts in every block\)")


def test_older_mixtral_expert_beyond_the_expert_count(variant, tmp_path):
    """One tensor per expert (before April 2024): an expert number the count does not allow
    (the routers, which would disagree first, left out)."""
    bad = variant("legacy", family="mixtral-legacy", legacy_experts=True, metadata={"llama.expert_count": 2},
                  drop=("blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_inp.weight"))
    refused(bad, tmp_path, GGUFError, r"metadata disagrees with the tensors: blk\.\d\.ffn_(gate|up|down)\.2\.weight "
            r"is expert 2, llama\.expert_count is 2")
