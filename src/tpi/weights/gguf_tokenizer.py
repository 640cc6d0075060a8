"""A `tokenizers` tokenizer (tokenizer.json), tokenizer_config.json and the stop set from GGUF metadata.

A GGUF file stores its tokenizer as llama.cpp sees it: `tokenizer.ggml.model` (the kind),
`.tokens`, `.token_type`, `.merges` (or `.scores`), `.pre` (the pre-tokenizer's name), the
special token ids, `add_bos_token` / `add_space_prefix`, and `tokenizer.chat_template`.
Two kinds are rebuilt here, as transformers' GGUF loader rebuilds them (its `GPT2Tokenizer`,
`LlamaTokenizer` and `GemmaTokenizer` backends, which tests/engine/test_gguf.py (SmolLM2's
file) and tests/engine/test_gguf_gemma_tokenizer.py (a Gemma-shaped vocabulary) compare against):

  gpt2   byte-level BPE (Llama 3, Qwen, SmolLM): tokens spelled in GPT-2's byte alphabet,
         the merges as given; a named pre-tokenizer split (llama3, qwen2, ...) before the
         byte-level mapping, else GPT-2's own regex.
  llama  SentencePiece BPE (Llama 2, Mistral): "▁" for spaces, byte fallback (<0x..>
         tokens), merges as given or else derived from the vocabulary and its scores.
         Gemma's files (architecture gemma, gemma2, gemma3; transformers' GemmaTokenizer)
         differ in two ways: llama.cpp's converter writes Gemma's runs-of-spaces pieces
         ("▁▁", ...; user-defined) with real spaces ("  "), which are spelled back with "▁"
         here; and their merges, absent from the file, are ranked by the tokens' order in the
         file, not by their scores (which do not follow Gemma's merge order).

Tokens of type CONTROL (3) become special tokens, USER_DEFINED (4) plain added tokens, so
neither is cut into pieces.
"""
from __future__ import annotations

import json

from tpi.weights.gguf_file import GGUFError

CONTROL, USER_DEFINED = 3, 4
# general.architecture values whose SentencePiece vocabulary transformers rebuilds as Gemma's
GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex its merges were learned with (others: GPT-2's)
PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# Control tokens that end a chat turn, recognised by their text (as llama.cpp's llama-vocab.cpp
# adds them to its end-of-generation set): a file may declare only its document end as eos
# (Gemma's <eos>) while its chat replies end with one of these (Gemma's <end_of_turn>, 106).
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|eom_id|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(meta: dict, where: str = "GGUF"):
    """The tokenizers.Tokenizer the metadata describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{where}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(tokens)}
        merges = _merges(meta, vocab, meta.get("tokenizer.ggml.scores"))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                   continuing_subword_prefix="", end_of_word_suffix=""))
        split = PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        specials_ok = lambda t: set(t) <= alphabet  # noqa: E731 (a byte-level vocabulary's own spelling)
    elif kind == "llama":
        if meta.get("general.architecture") in GEMMA_ARCHS:
            # "  " -> "▁▁" (transformers' rule would also respell mixed runs like "\n ")
            spelled = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
            ranks = [-float(i) for i in range(len(tokens))]  # the file's order: first = best
        else:
            spelled, ranks = tokens, meta.get("tokenizer.ggml.scores")
        vocab = {t: i for i, t in enumerate(spelled)}
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta, vocab, ranks), fuse_unk=True,
                                   byte_fallback=True, unk_token=spelled[unk] if unk is not None else None))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
        specials_ok = lambda t: True  # noqa: E731
    else:
        raise GGUFError(f"{where}: tokenizer kind {kind!r} (tokenizer.ggml.model) is not supported; "
                        "TPI builds gpt2 (byte-level BPE) and llama (SentencePiece BPE)")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL and specials_ok(t)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def _merges(meta: dict, vocab: dict[str, int], ranks: list[float] | None) -> list[tuple[str, str]]:
    """The merges as given, or derived from a SentencePiece vocabulary (token -> id) and a rank
    per id (higher = merged first): every split of a token into two tokens, best rank first
    (as transformers' generate_merges; a token spelled twice counts once, at its last id)."""
    given = meta.get("tokenizer.ggml.merges")
    if given:
        return [tuple(m.split(" ", 1)) for m in given]
    if ranks is None:
        return []
    merges = []
    for token, i in vocab.items():
        local = [(token[:k], token[k:], ranks[i]) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def stop_token_ids(meta: dict) -> list[int]:
    """The ids that end generation, eos first: `tokenizer.ggml.eos_token_id`, `.eot_token_id`
    and `.eom_token_id` when present, and the CONTROL tokens whose text is in END_OF_TURN.
    The one place a GGUF source's stop set is decided (written to config.json and
    generation_config.json as eos_token_id, where tpi.engine reads it)."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ids += [i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_TURN]
    return list(dict.fromkeys(i for i in ids if i is not None))  # in order, once each


def tokenizer_files(meta: dict, where: str = "GGUF") -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json (chat template, bos / eos tokens) for a
    model directory, as tpi.tokenizer.ChatTokenizer reads them."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= i < len(tokens):
            config[name] = tokens[i]
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {"tokenizer.json": build_tokenizer(meta, where).to_str().encode(),
            "tokenizer_config.json": json.dumps(config, indent=1).encode()}
