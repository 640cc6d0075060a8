"""A GGUF source's stop set: eos, the declared end-of-turn / end-of-message ids, and the
control tokens that end a chat turn by their text (tpi.weights.gguf_tokenizer.stop_token_ids).
A Gemma 3 file declares only <eos>; its replies end with <end_of_turn>, where generation
must stop (llama.cpp's end-of-generation set; Gemma's own generation_config lists [1, 106])."""
from __future__ import annotations

from test_gguf_gemma_tokenizer import USER_DEFINED, write_vocab_gguf

from tpi.engine import build_inproc_engine
from tpi.model.sampling import SamplingParams
from tpi.settings import ModelSettings, RuntimeOptions

PROMPT = [1, 504, 3458, 282, 4649, 314, 9889, 30, 57, 1000, 20000]
NEW_TOKENS = 16
OPTS = RuntimeOptions(dtype="float32", max_seq=128)


def test_gemma_vocabulary_stops_at_end_of_turn(tmp_path):
    """The Gemma-shaped vocabulary (<eos> 1, <end_of_turn> 9, both control tokens): the
    stop set is both, as the tokenizer built from the same file spells them; declared
    eot / eom ids join it; a marker that is not a control token does not."""
    from tpi.tokenizer import ChatTokenizer
    from tpi.weights.gguf_file import GGUFFile
    from tpi.weights.gguf_tokenizer import stop_token_ids, tokenizer_files

    path = write_vocab_gguf(tmp_path / "gemma3.gguf", "gemma3")
    meta = GGUFFile(path).metadata
    (tmp_path / "model").mkdir()
    for name, data in tokenizer_files(meta, path.name).items():
        (tmp_path / "model" / name).write_bytes(data)
    tok = ChatTokenizer(tmp_path / "model")
    end = tok.token_id("<end_of_turn>")
    assert stop_token_ids(meta) == [tok.token_id("<eos>"), end] == [1, 9]
    assert tok.encode_chat([{"role": "user", "content": "hi"}]).count(end) == 1  # what the template ends turns with
    declared = {"tokenizer.ggml.eot_token_id": 5, "tokenizer.ggml.eom_token_id": 6}
    assert stop_token_ids(dict(meta, **declared)) == [1, 5, 6, 9]
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    tokens[10], types[9] = "<|im_end|>", USER_DEFINED  # "\n" respelled, <end_of_turn> demoted
    assert types[10] == USER_DEFINED
    assert stop_token_ids(dict(meta, **{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types})) == [1]


def _end_of_turn_at(hf_dir, source, token: int, out):
    """`hf_dir`'s model as a GGUF file with `source`'s vocabulary (SmolLM2's gpt2) made
    Gemma-like: eos "<eos>" (id 0) and `token`'s text swapped with <|im_end|>'s (id 2), then named "<end_of_turn>" (control). The
    weights are untouched: the same ids come out, only what they are called changed."""
    from gguf_models import write_gguf
    from tpi.weights.gguf_file import GGUFFile

    meta = GGUFFile(source).metadata
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    tokens[2], types[2] = tokens[token], types[token]  # the displaced text stays in the vocabulary (merges)
    tokens[token], types[token] = "<end_of_turn>", 3
    tokens[0] = "<eos>"
    return write_gguf(hf_dir, out, "F16", source, metadata={
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.padding_token_id": 0})


def test_gemma_reply_stops_at_end_of_turn(gguf_model):
    """A random-weight Gemma 3 file's greedy reply runs its full length; the same weights
    with the token it produces sixth-or-later renamed <end_of_turn> stop right before it,
    with the stop set the generator was built with, not one the test sets."""
    from tpi.weights.gguf_source import GGUFCheckpoint
    from tpi.weights.sources import cache_dir

    plain = gguf_model("gemma3", "F16")
    engine = build_inproc_engine(ModelSettings(str(plain), [1.0]), OPTS)
    try:
        assert engine.generator.stop_ids == {2}  # SmolLM2's vocabulary: <|im_end|> is its eos
        free = engine.generator.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS))
    finally:
        engine.close()
    assert free.finish_reason == "length" and len(free.tokens) == NEW_TOKENS
    # a token first produced at step k >= 5 (not a control token, not the eos)
    k = next(i for i, t in enumerate(free.tokens) if i >= 5 and t > 16 and t not in free.tokens[:i])
    end = free.tokens[k]
    path = _end_of_turn_at(gguf_model.hf_dir("gemma3"), plain, end,
                           cache_dir() / "gguf-models" / "gemma3-end-of-turn-F16.gguf")
    assert GGUFCheckpoint(path).config.eos_token_ids == (0, end)
    engine = build_inproc_engine(ModelSettings(str(path), [1.0]), OPTS)
    try:
        assert engine.generator.stop_ids == {0, end}
        assert engine.tokenizer.token_id("<end_of_turn>") == end
        out = engine.generator.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS))
    finally:
        engine.close()
    assert (out.tokens, out.finish_reason) == (free.tokens[:k], "stop")
    _stale_store_is_rebuilt(path, engine.store.root, end)


def _stale_store_is_rebuilt(path, root, end: int) -> None:
    """The store of `path` as the code before the rule cut it (eos 0 alone in its manifest's
    config, config.json and generation_config.json) is rebuilt with the set; an up-to-date
    store is reused as it is."""
    import json

    def stops():
        engine = build_inproc_engine(ModelSettings(str(path), [1.0]), OPTS)
        engine.close()
        return engine.generator.stop_ids

    manifest = root / "manifest.json"
    built = manifest.stat().st_mtime_ns
    assert stops() == {0, end} and manifest.stat().st_mtime_ns == built  # reused
    m = json.loads(manifest.read_text())
    m["model_config"]["eos_token_ids"] = [0]
    manifest.write_text(json.dumps(m))
    for name in ("config.json", "generation_config.json"):
        f = root / "model" / name
        f.write_text(json.dumps(dict(json.loads(f.read_text()), eos_token_id=0)))
    assert stops() == {0, end} and manifest.stat().st_mtime_ns != built
