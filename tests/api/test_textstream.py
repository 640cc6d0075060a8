"""Incremental detokenization with SmolLM2's real tokenizer: the pieces add up to the
decoded text, multi-byte characters are never split, stop strings are cut wherever the
token boundaries fall."""
from __future__ import annotations

import pytest

from tpi.tokenizer import ChatTokenizer
from tpi_master.textstream import TextStream

TEXT = "L'Étoile brille 🌟 sur Paris — naïve café, 東京 too.\nNext line"


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return ChatTokenizer(smollm2_dir)


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            return pieces
    pieces.append(stream.finish())
    return pieces


def test_pieces_add_up_and_never_split_characters(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    pieces = feed(TextStream(tok), ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 10  # text flows as tokens arrive


@pytest.mark.parametrize("stop,expected", [
    (("Paris",), "L'Étoile brille 🌟 sur "),
    (("é, 東",), "L'Étoile brille 🌟 sur Paris — naïve caf"),
    (("\n",), "L'Étoile brille 🌟 sur Paris — naïve café, 東京 too."),
    (("nowhere", "brille"), "L'Étoile "),
])
def test_stop_strings_cut_the_text(tok, stop, expected):
    stream = TextStream(tok, stop)
    pieces = feed(stream, tok.encode(TEXT, add_special_tokens=False))
    assert stream.stopped
    assert "".join(pieces) == expected == stream.text


def test_a_partial_stop_string_is_released_at_the_end(tok):
    stream = TextStream(tok, ("Next lineX",))
    pieces = feed(stream, tok.encode(TEXT, add_special_tokens=False))
    assert not stream.stopped and "".join(pieces) == TEXT
