"""A Gemma 3 GGUF file's SentencePiece tokenizer, rebuilt by TPI from the metadata, equals
transformers' own GGUF tokenizer loading of the same file (its GemmaTokenizer path for
gemma3): ids with and without special tokens, decoded text, the chat prompt.

No Gemma vocabulary is available offline, so the file carries a small synthetic vocabulary
laid out as llama.cpp's converter writes Gemma's (convert_hf_to_gguf.py, _set_vocab_sentencepiece
then the tokenizer_config added tokens): control tokens first, Gemma's user-defined runs of
newlines, tabs and spaces (spaces written as real spaces, score -1000), the 256 byte tokens
<0x00>..<0xFF> (type BYTE, score 0), then single characters and merged pieces; no merges, so
they are derived from the vocabulary; add_space_prefix false. The merged pieces' scores are
shuffled: transformers ranks Gemma's derived merges by file order because Gemma's scores do
not follow it, so a rebuild ranking them by score gives other ids on these texts. The same
vocabulary as a llama file (Llama 2 style: space prefix, merges ranked by score) checks
TPI's plain SentencePiece path against transformers' LlamaTokenizer conversion too.
"""
from __future__ import annotations

import random

import pytest

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # llama.cpp's token types
CHARS = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:()é")
MERGED = ["▁t", "he", "▁the", "in", "▁a", "er", "on", "▁w", "or", "ld", "▁wor", "▁world", "ll", "▁he", "▁hell",
          "▁hello", "He", "Hell", "Hello", "is", "▁is", "▁c", "ap", "it", "al", "▁cap", "▁capit", "▁capital", "▁o",
          "▁of", "▁F", "ra", "nce", "an", "▁Fr", "▁Fran", "▁France", "▁\n", "s▁", "en", "▁en", "ing", "▁in", "at",
          "▁at", "es", "re", "▁re", "ou", "▁you", "▁y", "ar", "▁ar", "▁are", "ow", "▁how", "▁h", "ho", "▁ho", "12",
          "123", "▁1", "é▁", "▁é"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
            "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# runs of 9 and 11 spaces: longer than the file's longest space piece (8), where matching the
# pieces whole (as llama.cpp does) and merging them from "▁"s (transformers) part ways
TEXTS = ["", "Hello world", "hello world", " hello", "hello ", "  hello  world   ", "     ", " ", "\n", "\n \n  \n",
         "a" + " " * 9 + "b", "if x:\n" + " " * 11 + "return x  ",
         "the capital of France is Paris.\n\nHow are you?\n", "tab\there\t\tend", "123 1234 12",
         "é émigré café 😀 中文 ∑", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
         "<bos>x<eos> <pad>", "a<table><tr>b"]


def gemma_shaped_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) in Gemma's order (ids 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>)."""
    tokens, scores, types = [], [], []

    def add(token, score, kind):
        tokens.append(token), scores.append(score), types.append(kind)

    for t in ("<pad>", "<eos>", "<bos>"):
        add(t, 0.0, CONTROL)
    add("<unk>", 0.0, UNKNOWN)
    for t in ("<mask>", "[@BOS@]", "<unused0>", "<unused1>", "<start_of_turn>", "<end_of_turn>"):
        add(t, -1000.0, CONTROL)
    for t in ["\n" * k for k in range(1, 6)] + [" " * k for k in range(2, 9)] + ["\t", "\t\t", "<table>", "<tr>"]:
        add(t, -1000.0, USER_DEFINED)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, BYTE)
    first = len(tokens)
    for i, t in enumerate(CHARS + MERGED):
        add(t, -float(i), NORMAL)
    merged = range(first + len(CHARS), len(tokens))
    shuffled = [scores[i] for i in merged]
    random.Random(0).shuffle(shuffled)
    for i, s in zip(merged, shuffled):
        scores[i] = s
    return tokens, scores, types


def write_vocab_gguf(path, arch: str):
    """A vocabulary-only GGUF file (hyperparameters, tokenizer, chat template; no tensors)."""
    import gguf

    tokens, scores, types = gemma_shaped_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1), w.add_context_length(512), w.add_embedding_length(256), w.add_feed_forward_length(512)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama"), w.add_tokenizer_pre("default")
    w.add_token_list(tokens), w.add_token_scores(scores), w.add_token_types(types)
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_unk_token_id(3), w.add_pad_token_id(0)
    w.add_add_bos_token(True), w.add_add_eos_token(False), w.add_add_space_prefix(arch == "llama")
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(params=["gemma3", "llama"])
def tokenizers(request, tmp_path):
    """(TPI's ChatTokenizer, transformers' tokenizer) for the same vocabulary-only file."""
    from transformers import AutoTokenizer

    from tpi.tokenizer import ChatTokenizer
    from tpi.weights.gguf_file import GGUFFile
    from tpi.weights.gguf_tokenizer import tokenizer_files

    path = write_vocab_gguf(tmp_path / f"{request.param}.gguf", request.param)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name, data in tokenizer_files(GGUFFile(path).metadata, path.name).items():
        (model_dir / name).write_bytes(data)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    return request.param, ChatTokenizer(model_dir), hf


def test_encode_decode_equal_transformers(tokenizers):
    arch, ours, hf = tokenizers
    if arch == "gemma3":  # the file is read as Gemma's, or this test proves nothing about Gemma
        assert type(hf).__name__ == "GemmaTokenizer"
    for text in TEXTS:
        for special in (True, False):
            ids = hf.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), (text, special)
    # what the texts exercise: byte fallback, space runs, the control tokens kept whole
    ids = {i for text in TEXTS for i in hf.encode(text)}
    assert {hf.convert_tokens_to_ids(t) for t in ("<0xF0>", "<0xE4>", "<start_of_turn>", "<end_of_turn>")} <= ids
    spaces = 16  # the file's "   ": Gemma's reads it as "▁▁▁", merged from "▁"s; llama's as an added token
    assert spaces in ids and ours.decode([hf.convert_tokens_to_ids("a"), spaces]) == "a   "


def test_chat_prompt_equals_transformers(tokenizers):
    _, ours, hf = tokenizers
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "the capital of France?  "}]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ours.encode_chat(messages) == want
    assert (ours.bos_token, ours.eos_token, ours.stop_ids()) == ("<bos>", "<eos>", {1})
